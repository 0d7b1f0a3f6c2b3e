"""No silent fallback: what runs is said at start, and a launch that cannot run as asked is an error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launch_helpers import failure_text, free_port


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN = str(REPO / "recipes/data/demo_train.jsonl")


def _recipe(tmp_path, model_dir) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "train": {"max_steps": 1, "per_device_train_batch_size": 2, "disable_tqdm": True},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(tmp_path, recipe: Path, *launcher: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "moetune", "train", str(recipe)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fsdp1_on_cpu_ranks_is_an_error_not_a_ddp_run(tiny_model_dir, tmp_path):
    # FSDP2 runs on CPU ranks (moetune/cpu_fsdp.py, tests/test_distributed_fsdp.py); FSDP1 cannot.
    result = _launch(tmp_path, _recipe(tmp_path, tiny_model_dir("mixtral")), "--use_fsdp", "--fsdp_version", "1")
    assert result.returncode != 0
    assert "the launcher asked for FSDP version 1" in result.stderr and "--fsdp_version 2" in result.stderr
    assert "Traceback" not in result.stderr.split("moetune train: error:")[0]  # the error comes before any crash
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_ddp_on_cpu_ranks_says_what_runs(tiny_model_dir, tmp_path):
    result = _launch(tmp_path, _recipe(tmp_path, tiny_model_dir("mixtral")), "--multi_gpu")
    assert result.returncode == 0, failure_text(result)
    line = ("distributed: MULTI_CPU, world size 2, backend gloo, parameters replicated on every rank (DDP, "
            "DistributedDataParallel); experts whole on every rank (4 of 4)")
    assert result.stdout.count(line) == 1  # said once, by the main process, read from the prepared model
    assert result.stdout.count("Done: ") == 1  # and the final summary once


def test_single_process_says_what_runs(tiny_model_dir, tmp_path, capsys):
    from moetune.cli import main

    assert main(["train", str(_recipe(tmp_path, tiny_model_dir("mixtral")))]) == 0
    assert "distributed: NO, world size 1, backend none, one process; experts whole on every rank (4 of 4)" in (
        capsys.readouterr().out)


def test_unrelated_processes_are_an_error(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from moetune.errors import MoetuneError
    from moetune.launch_check import check_launch

    alone = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1))
    with pytest.raises(MoetuneError, match="2 unrelated runs"):
        check_launch(alone, environ={"WORLD_SIZE": "2"})
    with pytest.raises(MoetuneError, match="asked for DEEPSPEED"):
        check_launch(alone, environ={"ACCELERATE_USE_DEEPSPEED": "true"})
    check_launch(alone, environ={})
    ddp = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
    with pytest.raises(MoetuneError, match="asks for `distributed.strategy: fsdp2` but accelerate set up MULTI_CPU"):
        check_launch(ddp, environ={"WORLD_SIZE": "2"}, strategy="fsdp2")
    check_launch(ddp, environ={"WORLD_SIZE": "2"}, strategy="ddp")


def test_prepared_model_must_match_the_distributed_type():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch import nn

    from moetune.errors import MoetuneError
    from moetune.launch_check import check_prepared, holding

    model = nn.Module()
    model.experts = nn.Module()
    model.experts.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 2))
    with pytest.raises(MoetuneError, match="no parameter of the prepared Module is sharded"):
        check_prepared(model, SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(MoetuneError, match="not DistributedDataParallel"):
        check_prepared(model, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    check_prepared(model, SimpleNamespace(distributed_type=DistributedType.NO))
    assert holding(model, 1) == "one process; experts whole on every rank (4 of 4)"
