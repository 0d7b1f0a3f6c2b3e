"""Time data preparation (read + tokenize + report) before and after the move to `datasets` with a cache.

    PYTHONPATH=. .venv/bin/python scripts/bench_data.py --rows 10000 100000 1000000

"before" is `moetune/data.py` as of --old-rev (one Python loop, no cache), loaded from git. "after" is the current
`load_datasets`: cold (empty cache), warm (second call: the cache), and limited (`max_rows` for a 450-step run at
batch 8, as `moetune train` passes when train.max_steps is set), each on a fresh cache dir. Data: chat rows in
the demo's `messages` format, tokenized with the tiny ChatML tokenizer (`moetune.tiny.build_tokenizer`). One
markdown table row per size is printed as soon as it is measured, so a long run records what finished.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            row = {"messages": [{"role": "user", "content": f"What is {i % 97} plus {i % 13}? Answer in words."},
                                {"role": "assistant", "content": f"It is {i % 97 + i % 13}, row {i}."}]}
            f.write(json.dumps(row) + "\n")


def old_loader(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:moetune/data.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_datasets


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--old-rev", default="6ac25e8", help="git revision of the loader before the change")
    parser.add_argument("--limited-rows", type=int, default=450 * 8, help="max_rows for the limited variant")
    args = parser.parse_args()

    import datasets
    import torch

    from moetune.config import DataSection
    from moetune.data import load_datasets
    from moetune.tiny import build_tokenizer

    torch.set_num_threads(2)
    datasets.disable_progress_bars()
    tokenizer = build_tokenizer()
    before = old_loader(args.old_rev)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    print("| rows | before (s) | after, cold (s) | after, warm (s) | after, max_rows (s) | cold speed-up | warm speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in args.rows:
        path = work / f"chat_{n}.jsonl"
        write_rows(path, n)
        section = DataSection(train=str(path), format="messages", max_length=256)
        t_before = timed(before, section, tokenizer)
        datasets.config.HF_DATASETS_CACHE = str(work / f"cache_{n}")
        t_cold = timed(load_datasets, section, tokenizer)
        t_warm = timed(load_datasets, section, tokenizer)
        datasets.config.HF_DATASETS_CACHE = str(work / f"cache_{n}_limited")
        t_limited = timed(load_datasets, section, tokenizer, max_rows=args.limited_rows)
        print(f"| {n:,} | {t_before:.1f} | {t_cold:.1f} | {t_warm:.2f} | {t_limited:.1f} | {t_before / t_cold:.2f}x | "
              f"{t_before / t_warm:.0f}x |", flush=True)
        path.unlink()
    sys.exit(0)


if __name__ == "__main__":
    main()
