"""Two CPU processes over gloo train a tiny recipe: real DDP, parameters in sync, only rank 0 writes outputs."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import failure_text, free_port


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _recipe(tmp_path, model_dir) -> Path:
    path = tmp_path / "mp.yaml"
    path.write_text(
        f"model: {{name_or_path: {model_dir}, dtype: float32}}\n"
        "lora: {r: 4, targets: [attention]}\n"
        f"data: {{train: {REPO / 'recipes/data/demo_train.jsonl'}, eval: {REPO / 'recipes/data/demo_eval.jsonl'}, max_length: 64}}\n"
        "train: {max_steps: 4, per_device_train_batch_size: 4, learning_rate: 5.0e-3, logging_steps: 1, save_steps: 2,"
        " disable_tqdm: true}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    return path


def _env():
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_only_rank0_writes(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir("mixtral"))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/multiprocess_worker.py"), str(recipe), str(tmp_path / "report")]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, failure_text(run)
    ranks = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]

    for r, rank in enumerate(ranks):
        assert (rank["process_index"], rank["num_processes"]) == (r, 2)
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and rank["backend"] == "gloo"
    # Same trained weights on both ranks, and they did train (LoRA B starts at zero, so every B moved).
    assert ranks[0]["digests"] == ranks[1]["digests"] and len(ranks[0]["digests"]) == 16
    assert ranks[0]["metrics"]["global_step"] == 4 and ranks[0]["metrics"]["eval_loss"] < ranks[0]["metrics"]["eval_loss_start"]

    out = tmp_path / "out"
    # Python-level writes by rank 1 under the output dir: only the trainer's exist_ok makedirs of checkpoint dirs.
    assert all(w.startswith("os.mkdir ") and "/checkpoint-" in w for w in ranks[1]["writes"]), ranks[1]["writes"]
    assert any("metrics.json" in w for w in ranks[0]["writes"])
    # Files rank 1 created are group-writable (umask 0): the only ones are the per-rank RNG states that HF Trainer
    # saves from every rank so that --resume restores each rank's generator (and, racing rank 0, the checkpoint
    # directory they go in).
    by_rank1 = {str(p.relative_to(out)) for p in out.rglob("*") if p.stat().st_mode & stat.S_IWGRP}
    rng_files = {"checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"}
    assert rng_files <= by_rank1 <= rng_files | {"checkpoint-2", "checkpoint-4"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_accelerate_launch_runs_the_cli(tiny_model_dir, tmp_path):
    """The documented launch: `accelerate launch ... -m moetune train RECIPE` on two CPU processes."""
    recipe = _recipe(tmp_path, tiny_model_dir("mixtral"))
    accelerate = shutil.which("accelerate", path=str(BIN))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "moetune", "train", str(recipe)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, failure_text(run)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 4
