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
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_helpers import failure_text, free_port


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO_TRAIN = str(REPO / "recipes/data/demo_train.jsonl")
TRAIN = {"per_device_train_batch_size": 2, "learning_rate": 5.0e-3, "lr_scheduler_type": "constant",
         "logging_steps": 1, "save_steps": 2, "disable_tqdm": True, "seed": 7,
         "train_sampling_strategy": "sequential"}  # the same rows in the same batches, whatever the sampler seeding


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _recipe(path: Path, model_dir, out: Path, *, strategy: str, lora: dict | None, train: dict,
            samples: bool = False) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "moe": {"z_loss_coef": 1.0e-3},
        "distributed": {"strategy": strategy},
        "train": {**TRAIN, **train},
        "output": {"dir": str(out)},
    }
    if samples:  # eval before/after and sample answers: a sharded model's forwards need every rank
        recipe["data"]["eval"] = str(REPO / "recipes/data/demo_eval.jsonl")
        recipe["output"]["sample_prompts"] = 1
    if lora is not None:
        recipe["lora"] = lora
    else:
        recipe["freeze"] = {"train": ["all"]}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure_text(result)
    return result


def _one_node(program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """2 ranks on one machine: `accelerate launch --multi_gpu --num_processes 2 PROGRAM`."""
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
                 "--dynamo_backend", "no", *program], cwd)


def _two_nodes(program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Two launcher invocations with one process each, as two machines meeting at 127.0.0.1."""
    port = free_port()

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
    return _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *program], cwd)


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


def _train_both(tmp_path, model_dir, *, strategy: str, lora: dict | None, launch=_one_node, resume_launch=_torchrun,
                samples: bool = False):
    """2 ranks: 2 steps with `moetune train`, then --resume to 4 in the worker; and the one-process reference."""
    ranks_out, ref_out = tmp_path / "ranks", tmp_path / "one"
    recipe = _recipe(tmp_path / "ranks.yaml", model_dir, ranks_out, strategy=strategy, lora=lora,
                     train={"max_steps": 2}, samples=samples)
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


# ---------------------------------------------------------------------------------------- default tier: the rules


def _base(**sections) -> dict:
    recipe = {"model": {"name_or_path": "org/model"}, "data": {"train": DEMO_TRAIN}, "output": {"dir": "out"}}
    recipe.update(sections)
    return recipe


@pytest.mark.parametrize(("sections", "message"), [
    ({"distributed": {"strategy": "fsdp2"}, "train": {"fsdp": "full_shard", "fsdp_config": {"version": 2}}},
     "`train.fsdp`, `train.fsdp_config` and `distributed.strategy: fsdp2` both choose the distributed engine"),
    ({"distributed": {"strategy": "ddp"}, "train": {"deepspeed": "ds.json"}},
     "`train.deepspeed` and `distributed.strategy: ddp` both choose"),
    ({"distributed": {"strategy": "fsdp2"}, "lora": {}, "quantization": {}},
     "`quantization` cannot be used with `distributed.strategy: fsdp2`"),
    ({"distributed": {"strategy": "fsdp2"}, "experts": {}},
     "`experts` (ESFT) cannot be used with `distributed.strategy: fsdp2`"),
    ({"distributed": {"strategy": "fsdp"}},
     "`distributed.strategy`: got 'fsdp'; allowed: 'auto', 'ddp', 'fsdp2', 'zero2' or 'zero3'"),
])
def test_distributed_recipe_rules(sections, message):
    from moetune.config import load_recipe
    from moetune.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(_base(**sections))
    assert message in str(err.value)


def test_auto_leaves_the_engine_keys_to_the_recipe():
    from moetune.config import load_recipe

    load_recipe(_base(train={"fsdp": "full_shard"}))  # strategy auto: the user's own engine settings stand
    load_recipe(_base(distributed={"strategy": "ddp"}, lora={}, quantization={}))  # QLoRA under DDP is fine


def test_strategy_against_the_launcher():
    from moetune.config import load_recipe
    from moetune.distributed import FSDP2_CONFIG, resolved_strategy, trainer_arguments
    from moetune.errors import MoetuneError

    fsdp2, auto = load_recipe(_base(distributed={"strategy": "fsdp2"})), load_recipe(_base())
    two = {"WORLD_SIZE": "2"}
    assert resolved_strategy(fsdp2, {}) == "single" and trainer_arguments(fsdp2, {}) == {}  # one process: no engine
    assert trainer_arguments(fsdp2, two) == {"fsdp": True, "fsdp_config": FSDP2_CONFIG}
    assert resolved_strategy(auto, two) == "ddp" and trainer_arguments(auto, two) == {}
    assert resolved_strategy(auto, {**two, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    assert resolved_strategy(fsdp2, {**two, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    with pytest.raises(MoetuneError, match=r"`distributed.strategy` is 'fsdp2' but the launcher asked for DEEPSPEED"):
        resolved_strategy(fsdp2, {**two, "ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(MoetuneError, match="asked for FSDP version 1"):
        resolved_strategy(fsdp2, {**two, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    ddp = load_recipe(_base(distributed={"strategy": "ddp"}))
    with pytest.raises(MoetuneError, match="'ddp' but the launcher asked for FSDP"):
        resolved_strategy(ddp, {**two, "ACCELERATE_USE_FSDP": "true"})


def test_fsdp2_becomes_trainer_fsdp_version_2_with_layer_wrapping(monkeypatch, tmp_path):
    from trl import SFTConfig

    from moetune.config import load_recipe
    from moetune.distributed import trainer_arguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments writes it; restored after
    kwargs = trainer_arguments(load_recipe(_base(distributed={"strategy": "fsdp2"})), {"WORLD_SIZE": "2"})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)  # as sft_config builds it
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    # No class named: accelerate wraps the model's _no_split_modules (its decoder layers, experts inside).
    assert args.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "transformer_cls_names_to_wrap" not in args.fsdp_plugin_args
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"


def test_cpu_fsdp_shim_is_gated_and_scoped(monkeypatch):
    import accelerate
    from accelerate.state import AcceleratorState

    from moetune.cpu_fsdp import fsdp_on_cpu
    from moetune.errors import MoetuneError

    original = AcceleratorState.__init__
    with fsdp_on_cpu():
        assert AcceleratorState.__init__ is not original
    assert AcceleratorState.__init__ is original
    monkeypatch.setattr(accelerate, "__version__", "9.9.9")
    with pytest.raises(MoetuneError, match=r"verified only with accelerate 1\.15\.0 \(installed: 9\.9\.9\)"):
        with fsdp_on_cpu():
            pass


def test_cpu_fsdp_shim_still_needed():
    """Fails once accelerate turns MULTI_CPU + an FSDP plugin into FSDP by itself: then delete moetune/cpu_fsdp.py."""
    import inspect

    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    gpu_like = source[source.index("elif self.distributed_type in ["):source.index('"ACCELERATE_USE_FSDP"')]
    assert "DistributedType.MULTI_GPU" in gpu_like and "MULTI_CPU" not in gpu_like


def test_routing_counts_sum_over_ranks(monkeypatch):
    """The reduction itself, with a stand-in for a second rank that saw other tokens."""
    import torch
    import torch.distributed as dist

    from moetune import telemetry

    counts = telemetry._Counts(4)
    counts.add(torch.softmax(torch.randn(6, 4), -1), torch.tensor([[0, 1]] * 6), None)
    other = torch.tensor([1.0, 0, 3, 0, 2, 0, 1, 1, 0.5, 2])  # slots, first choices, entropy sum, tokens
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other.to(t.dtype)))
    summed = telemetry._summed({0: counts})[0]
    assert summed.slots.tolist() == [7.0, 6.0, 3.0, 0.0] and summed.tokens == 8.0
    assert counts.slots.tolist() == [6.0, 6.0, 0.0, 0.0]  # the rank's own counts stay its own


# ------------------------------------------------------------------------------- slow tier: 2 CPU ranks over gloo


@pytest.mark.slow
def test_fsdp2_lora_on_two_cpu_ranks(tiny_model_dir, tmp_path):
    lora = {"r": 4, "targets": ["attention", "experts"]}
    first, report, ranks_out, ref_out = _train_both(tmp_path, tiny_model_dir("mixtral"), strategy="fsdp2", lora=lora,
                                                    samples=True)
    assert first.stdout.count("distributed: FSDP, world size 2, backend gloo, ") == 1
    assert first.stdout.count("Sample generations after training:") == 1  # all ranks generated, the main one said it
    assert "experts sharded over 2 ranks (E/2 per rank: 2 of 4)" in first.stdout
    _fsdp2_held(report)
    assert (ranks_out / "adapter_model.safetensors").is_file() and not (ranks_out / "model.safetensors").exists()
    _check_against_one_process(report, ranks_out, ref_out)
    # The adapter is plain PEFT: it loads onto the base with PeftModel.from_pretrained.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"), dtype="float32")
    peft_model = PeftModel.from_pretrained(base, str(ranks_out)).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=torch.arange(3, 40).reshape(1, -1)).logits
    # Plain PEFT leaves the router in the checkpoint's dtype (fp32 here, as moetune keeps it): the same logits.
    assert torch.allclose(logits, torch.tensor(report["logits"]), atol=1e-5)


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


@pytest.mark.slow
def test_fsdp2_bf16_keeps_the_routers_in_fp32(tiny_model_dir, tmp_path):
    """bf16 mixed precision casts a whole FSDP2 unit to bf16; the routers must still compute in fp32."""
    recipe = _recipe(tmp_path / "bf16.yaml", tiny_model_dir("mixtral"), tmp_path / "out", strategy="fsdp2", lora=None,
                     train={"max_steps": 1, "save_steps": 10})
    recipe.write_text(recipe.read_text().replace("dtype: float32", "dtype: bfloat16"))
    _torchrun([str(REPO / "tests/dist_worker.py"), str(recipe), str(tmp_path / "report.json")], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    _fsdp2_held(report)
    assert report["router_dtypes"] == ["torch.float32", "torch.float32"]  # both MoE layers
    assert all(math.isfinite(loss) for loss in report["losses"]) and len(report["losses"]) == 1
