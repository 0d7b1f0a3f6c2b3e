"""`distributed.strategy`: FSDP2 and DDP on 2 CPU ranks over gloo, checked against one process.

Each slow test trains a tiny Mixtral (E=4 experts) for 2 steps on 2 ranks with `moetune train` (the documented
launch), resumes it to 4 steps in `tests/dist_worker.py` (which records how the prepared model holds its weights
and its logits), and compares with one process running the same 4 global batches. The one-process reference uses
per-device batch 2 x gradient accumulation 2: the same micro-batches as the two ranks' batches of 2 (accelerate
gives rank r the batches r, r+2, ...), so even the aux and z losses, which are per-micro-batch means, match. The
learning rate is constant, so "2 steps, then --resume to 4" must give the uninterrupted trajectory.

Tolerances: the runs differ only in float summation order (gloo's all-reduce of the gradients, sharded vs whole
matmuls). Measured over these 4 fp32 steps: losses equal to 5e-7, the reloaded model's logits equal to the trained
sharded model's bit for bit and to the one-process model's to 5e-7 (logits of magnitude ~1). The tests allow 1e-5,
20x that and far below what a real fault does: a resume that lost the optimizer state or a weight (the bug
trainer.py guards against) moves the losses by 1e-2 or more, and a routing report of rank 0 alone counts half the
tokens.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO_TRAIN = str(REPO / "recipes/data/demo_train.jsonl")
TRAIN = {"per_device_train_batch_size": 2, "learning_rate": 5.0e-3, "lr_scheduler_type": "constant",
         "logging_steps": 1, "save_steps": 2, "disable_tqdm": True, "seed": 7,
         "train_sampling_strategy": "sequential"}  # the same rows in the same batches, whatever the sampler seeding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _recipe(path: Path, model_dir, out: Path, *, strategy: str, lora: dict | None, train: dict) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "moe": {"z_loss_coef": 1.0e-3},
        "distributed": {"strategy": strategy},
        "train": {**TRAIN, **train},
        "output": {"dir": str(out)},
    }
    if lora is not None:
        recipe["lora"] = lora
    else:
        recipe["freeze"] = {"train": ["all"]}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _one_node(program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """2 ranks on one machine: `accelerate launch --multi_gpu --num_processes 2 PROGRAM`."""
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                 "--dynamo_backend", "no", *program], cwd)


def _two_nodes(program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Two launcher invocations with one process each, as two machines meeting at 127.0.0.1."""
    port = _free_port()

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", *program]
        return subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    for n, (out, err) in zip(nodes, outputs):
        assert n.returncode == 0, out[-2000:] + err[-4000:]
    return subprocess.CompletedProcess([], 0, outputs[0][0] + outputs[1][0], outputs[0][1] + outputs[1][1])


def _torchrun(program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), *program], cwd)


def _reference(recipe_path: Path) -> Path:
    """The one-process run over the same tokens (in this process)."""
    from moetune.training import finetune

    out, _ = finetune(recipe_path, overrides=["train.max_steps=4", "train.per_device_train_batch_size=2",
                                              "train.gradient_accumulation_steps=2"])
    return out


def _losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def _logits(out: Path):
    import torch

    from moetune.inference import load_for_inference

    model, _ = load_for_inference(out)
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).reshape(1, -1)).logits.float()


def _train_both(tmp_path, model_dir, *, strategy: str, lora: dict | None, launch=_one_node, resume_launch=_torchrun):
    """2 ranks: 2 steps with `moetune train`, then --resume to 4 in the worker; and the one-process reference."""
    ranks_out, ref_out = tmp_path / "ranks", tmp_path / "one"
    recipe = _recipe(tmp_path / "ranks.yaml", model_dir, ranks_out, strategy=strategy, lora=lora,
                     train={"max_steps": 2})
    first = launch(["-m", "moetune", "train", str(recipe)], tmp_path)
    report_path = tmp_path / "report.json"
    resume_launch([str(REPO / "tests/dist_worker.py"), str(recipe), str(report_path), "--resume", "train.max_steps=4"],
                  tmp_path)
    ref_recipe = _recipe(tmp_path / "one.yaml", model_dir, ref_out, strategy=strategy, lora=lora, train={})
    _reference(ref_recipe)
    return first, json.loads(report_path.read_text()), ranks_out, ref_out


def _check_against_one_process(report: dict, ranks_out: Path, ref_out: Path) -> None:
    import torch

    # The resumed 2-rank run continues the trajectory of the uninterrupted one-process run.
    assert len(_losses(ranks_out)) == 4 and report["losses"] == _losses(ranks_out)
    assert _losses(ranks_out) == pytest.approx(_losses(ref_out), abs=1e-5)
    # The consolidated save loads on one process to the trained (sharded) model's logits, and to the reference's.
    reloaded = _logits(ranks_out)
    assert torch.allclose(reloaded, torch.tensor(report["logits"]), atol=1e-6)
    assert torch.allclose(reloaded, _logits(ref_out), atol=1e-5)
    # Routing telemetry covers both ranks' tokens: the same counts as one process over the same batches.
    ranks_routing = json.loads((ranks_out / "routing.json").read_text())
    ref_history = json.loads((ref_out / "routing.json").read_text())["history"]
    resumed = [h for h in ranks_routing["history"] if h["step"] in (3, 4)]
    assert [h["step"] for h in resumed] == [3, 4]
    for ours, theirs in zip(resumed, ref_history[2:]):
        for a, b in zip(ours["layers"], theirs["layers"]):
            assert a["tokens"] == b["tokens"] > 0
            assert a["share"] == pytest.approx(b["share"], abs=1e-6)


def _fsdp2_held(report: dict) -> None:
    assert (report["distributed_type"], report["world_size"], report["backend"]) == ("FSDP", 2, "gloo")
    assert report["wrapper"].startswith("FSDP")  # FSDP2 swaps the class in place: FSDPMixtralForCausalLM, FSDPPeftModel...
    assert report["experts"] and all(
        e["type"] == "DTensor" and e["shape"][0] == 4 and e["local_shape"][0] == 2 for e in report["experts"].values())


@pytest.mark.slow
def test_fsdp2_lora_on_two_cpu_ranks(tiny_model_dir, tmp_path):
    lora = {"r": 4, "targets": ["attention", "experts"]}
    first, report, ranks_out, ref_out = _train_both(tmp_path, tiny_model_dir("mixtral"), strategy="fsdp2", lora=lora)
    assert first.stdout.count("distributed: FSDP, world size 2, backend gloo, ") == 1
    assert "experts sharded over 2 ranks (E/2 per rank: 2 of 4)" in first.stdout
    _fsdp2_held(report)
    assert (ranks_out / "adapter_model.safetensors").is_file() and not (ranks_out / "model.safetensors").exists()
    _check_against_one_process(report, ranks_out, ref_out)
    # The adapter is plain PEFT: it loads onto the base with PeftModel.from_pretrained.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"), dtype="float32")
    assert isinstance(PeftModel.from_pretrained(base, str(ranks_out)), PeftModel)


@pytest.mark.slow
def test_fsdp2_full_fine_tune_on_two_cpu_ranks(tiny_model_dir, tmp_path):
    first, report, ranks_out, ref_out = _train_both(tmp_path, tiny_model_dir("mixtral"), strategy="fsdp2", lora=None)
    assert "distributed: FSDP, world size 2, backend gloo, 21 of 21 parameter tensors sharded as DTensor" in first.stdout
    _fsdp2_held(report)
    assert (ranks_out / "model.safetensors").is_file()
    _check_against_one_process(report, ranks_out, ref_out)


@pytest.mark.slow
def test_two_node_ddp_on_localhost(tiny_model_dir, tmp_path):
    """`--num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1`, one process per "machine"."""
    lora = {"r": 4, "targets": ["attention"]}
    first, report, ranks_out, ref_out = _train_both(tmp_path, tiny_model_dir("mixtral"), strategy="ddp", lora=lora,
                                                    launch=_two_nodes, resume_launch=_two_nodes)
    line = "distributed: MULTI_CPU, world size 2, backend gloo, parameters replicated on every rank (DDP, "
    assert first.stdout.count(line) == 1
    assert "experts whole on every rank (4 of 4)" in first.stdout
    assert (report["distributed_type"], report["world_size"], report["wrapper"]) == ("MULTI_CPU", 2,
                                                                                     "DistributedDataParallel")
    assert all(e["type"] == "Parameter" and e["local_shape"][0] == 4 for e in report["experts"].values())
    _check_against_one_process(report, ranks_out, ref_out)
