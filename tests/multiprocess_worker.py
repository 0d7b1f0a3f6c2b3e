"""Train a recipe on N processes and record, per rank, what the run looked like (for tests/test_multiprocess.py).

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/multiprocess_worker.py RECIPE REPORT_DIR [KEY=VALUE ...]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_worker.py ...

ACCELERATE_USE_CPU=true is what makes CPU ranks a real gloo process group (docs/upstream.md#accelerate-cpu); without it each process
trains alone. Each rank writes REPORT_DIR/rank<R>.json: the distributed setup, a digest of every trainable parameter
after training, and every file-system write it made under the recipe's output dir (recorded with an audit hook;
non-main ranks also run with umask 0, so files they create are group-writable, which catches C-level writes too).
"""

import hashlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    recipe_path, report_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    # The audit hook below sees Python-level writes only (torch.save and safetensors write from C++/Rust), so
    # non-main ranks also create files group-writable: any such file in the output dir was made by them.
    os.umask(0o022 if os.environ.get("RANK", "0") == "0" else 0o000)
    from moetune.config import load_recipe

    out_dir = str(Path(load_recipe(recipe_path, overrides).output.dir).resolve())
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        # Only writes: open() for writing/creating, and directory or file creation/removal/renames.
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2] or 0
            if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = os.path.abspath(os.fspath(args[0]))
                if path.startswith(out_dir):
                    writes.append(f"{event} {path}")
        elif event in ("os.mkdir", "os.remove", "os.rename", "shutil.rmtree", "os.rmdir"):
            path = os.path.abspath(os.fspath(args[0]))
            if path.startswith(out_dir):
                writes.append(f"{event} {path}")

    sys.addaudithook(audit)

    from trainer_capture import record_trainers

    from moetune.training import finetune

    trainers = record_trainers()  # to read the trained model afterwards
    _, metrics = finetune(recipe_path, overrides=overrides)

    from accelerate import PartialState

    state = PartialState()
    model = trainers[0].model
    digests = {name: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
               for name, p in model.named_parameters() if p.requires_grad}
    losses = [h["loss"] for h in trainers[0].state.log_history if "loss" in h]
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{state.process_index}.json").write_text(json.dumps({
        "process_index": state.process_index, "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type), "backend": state.backend,
        "is_main_process": state.is_main_process, "wrapped_as": type(trainers[0].model_wrapped).__name__,
        "parallel_mode": str(trainers[0].args.parallel_mode), "world_size": trainers[0].args.world_size,
        "param_sums": {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if p.requires_grad},
        "digests": digests, "losses": losses,
        "writes": writes, "metrics": metrics,
    }, indent=1))


if __name__ == "__main__":
    main()
