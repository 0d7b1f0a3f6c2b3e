"""Pretrain a tiny Mixtral on synthetic "general" data, so that its routers are not random (a few minutes on CPU).

    python scripts/pretrain_tiny.py --out runs/pretrained-tiny            # model in runs/pretrained-tiny/model

Writes, under --out:
  data/general_{train,eval}.jsonl  the pretraining mix: next weekday/month, counting up, colours, reversing a list,
                                   adding small numbers (the demo's tasks), chat format
  data/task_{train,eval}.jsonl     a downstream task that pretraining never shows: previous weekday/month and counting
                                   down (related skills, new direction), for fine-tuning benchmarks
  model/                           the pretrained model (moetune's full fine-tuning run dir, loadable with
                                   AutoModelForCausalLM.from_pretrained)
"""

import argparse
import json
import random
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_demo_data import DAYS, MONTHS, NUMBERS, example  # noqa: E402 -- the demo's general tasks


def task_example(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(7)
        return f"What day comes before {DAYS[i]}?", f"{DAYS[(i - 1) % 7]}."
    if kind == 1:
        i = rng.randrange(12)
        return f"What month comes before {MONTHS[i]}?", f"{MONTHS[(i - 1) % 12]}."
    n = rng.randrange(2, 11)
    return f"Count down from {NUMBERS[n]} to one.", " ".join(reversed(NUMBERS[1 : n + 1])) + "."


def write_rows(path: Path, make, count: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            question, answer = make(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def write_data(out: Path) -> dict[str, str]:
    data = out / "data"
    files = {name: str(data / f"{name}.jsonl") for name in ("general_train", "general_eval", "task_train", "task_eval")}
    write_rows(Path(files["general_train"]), example, 3000, seed=11)
    write_rows(Path(files["general_eval"]), example, 200, seed=12)
    write_rows(Path(files["task_train"]), task_example, 600, seed=13)
    write_rows(Path(files["task_eval"]), task_example, 100, seed=14)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/pretrained-tiny")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()

    import torch

    from moetune.tiny import make_tiny
    from moetune.training import finetune

    torch.set_num_threads(2)
    out = Path(args.out)
    files = write_data(out)
    base = make_tiny("mixtral", out / "random", hidden_size=128, num_hidden_layers=4, intermediate_size=128,
                     num_local_experts=args.experts)
    recipe = {
        "model": {"name_or_path": str(base), "dtype": "float32", "experts_implementation": "grouped_mm"},
        "moe": {"aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        "data": {"train": files["general_train"], "eval": files["general_eval"], "max_length": 96,
                 "assistant_only_loss": False},  # pretraining: every token
        "train": {"num_train_epochs": args.epochs, "per_device_train_batch_size": 16, "learning_rate": 2e-3,
                  "lr_scheduler_type": "cosine", "warmup_steps": 20, "logging_steps": 50, "save_strategy": "no",
                  "seed": 0, "disable_tqdm": True},
        "output": {"dir": str(out / "model")},
    }
    run, metrics = finetune(recipe, overwrite=True)
    print(json.dumps({"model": str(run), **{k: metrics.get(k) for k in ("eval_loss_start", "eval_loss", "train_runtime_s")}}))


if __name__ == "__main__":
    main()
