"""`distributed.strategy: zero2|zero3`: moetune's own DeepSpeed config, run for real on 2 CPU ranks over gloo.

The slow tests launch `torchrun` once per stage (tests/distributed_worker.py) and check, from that one launch: the
engine and ZeRO stage that ran, how the parameters were held, an exact resume, and a consolidated save that
reloads on one process to the logits the 2-rank engine computed.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from launch_helpers import failure_text, free_port

from moetune.config import load_recipe
from moetune.errors import MoetuneError, RecipeError


REPO = Path(__file__).resolve().parent.parent
# CI installs the deepspeed extra (scripts/install.sh --dev); a checkout without it skips what needs the package.
needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="pip install moetune[deepspeed]")
BIN = Path(sys.executable).parent
DATA = REPO / "recipes/data"


def _recipe(tmp_path, model_dir, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(DATA / "demo_train.jsonl"), "max_length": 64},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5.0e-3, "logging_steps": 1,
                  "save_steps": 2, "disable_tqdm": True},
        "output": {"dir": str(tmp_path / "out")},
    }
    recipe.update(sections)
    return recipe


# ------------------------------------------------------------------------------------------ fast: recipe rules


def test_zero_config_has_the_stage_auto_values_16bit_save_and_no_leaves():
    from moetune.deepspeed_setup import deepspeed_config

    two, three = deepspeed_config(2), deepspeed_config(3)
    assert two["zero_optimization"]["stage"] == 2 and three["zero_optimization"]["stage"] == 3
    # HF Trainer fills "auto" from trl.SFTConfig: the recipe's batch size, accumulation and clipping stay in charge.
    assert two["train_micro_batch_size_per_gpu"] == "auto" and two["gradient_accumulation_steps"] == "auto"
    assert three["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # DeepSpeed's default MoE leaf classes are switched off (they break full fine-tuning of fused experts; see
    # test_zero3_full_finetune_with_a_rank_whose_experts_get_no_tokens).
    assert three["zero_optimization"]["leaf_module"] == {"classes": []}
    assert "stage3_gather_16bit_weights_on_model_save" not in two["zero_optimization"]


@needs_deepspeed
def test_deepspeed_arguments_only_for_zero_on_several_ranks(tmp_path):
    from moetune.deepspeed_setup import deepspeed_arguments
    from moetune.training import sft_config

    zero2 = load_recipe(_recipe(tmp_path, "m", distributed={"strategy": "zero2"}))
    assert deepspeed_arguments(zero2, world_size=2)["deepspeed"]["zero_optimization"]["stage"] == 2
    assert deepspeed_arguments(load_recipe(_recipe(tmp_path, "m")), world_size=2) == {}
    # One process ignores the `distributed` section (this test process is one).
    assert deepspeed_arguments(zero2, world_size=1) == {} and sft_config(zero2, has_eval=False).deepspeed is None


def test_missing_deepspeed_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from moetune.deepspeed_setup import deepspeed_arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(MoetuneError, match=r"distributed.strategy='zero3'.*pip install moetune\[deepspeed\]"):
        deepspeed_arguments(load_recipe(_recipe(tmp_path, "m", distributed={"strategy": "zero3"})))


@pytest.mark.parametrize("extra, match", [
    ({"quantization": {"bits": 4}, "lora": {"r": 4}}, r"`quantization` \(4-bit\) cannot be combined with distributed.strategy='zero3'.*use distributed.strategy: zero2"),
    ({"train": {"deepspeed": {"zero_optimization": {"stage": 1}}}}, r"`train.deepspeed` and `distributed.strategy: zero3` both choose"),
])
def test_what_zero_cannot_combine_with_is_named(tmp_path, extra, match):
    from moetune.deepspeed_setup import deepspeed_arguments

    raw = _recipe(tmp_path, "m", distributed={"strategy": "zero3"})
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(RecipeError, match=match):
        deepspeed_arguments(load_recipe(raw))


def test_describe_sharding_is_none_without_zero3(tiny_model_dir):
    from moetune.deepspeed_setup import describe_sharding
    from moetune.loading import load_model

    model, _ = load_model(str(tiny_model_dir("mixtral")), with_tokenizer=False)
    assert describe_sharding(model) is None


# ------------------------------------------------------------------------------------ slow: 2 ranks over gloo


def _launch(tmp_path, recipe: dict, *flags: str, env_extra=None) -> list[dict]:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # DeepSpeed compiles a small C++ op on first use (~35 s); torch caches the build in ~/.cache/torch_extensions.
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/distributed_worker.py"), str(path), str(tmp_path / "report"), *flags]
    # A hang (the ZeRO-3 MoE failure this guards against) must fail the test, not stall CI.
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, failure_text(run)
    return [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _one_process_logits(base_dir, saved_dir, *, starved: bool, adapter: bool, quantization=None, adapter_dtype=None):
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from distributed_worker import fixed_batch, starve

    from moetune.config import ModelSection, QuantizationSection
    from moetune.loading import load_model

    section = ModelSection(name_or_path=str(base_dir if adapter else saved_dir), dtype="float32")
    model, tokenizer = load_model(section, QuantizationSection(**quantization) if quantization else None)
    if adapter:
        from moetune.adapters import load_adapter

        model = load_adapter(model, saved_dir)  # PEFT's nesting order differs on a 4-bit base (docs/upstream.md)
        for name, param in model.named_parameters():
            if adapter_dtype is not None and "lora_" in name:  # PEFT loads adapters in fp32
                param.data = param.data.to(adapter_dtype)
    if starved:
        starve(model)
    model.eval()
    with torch.no_grad():
        return model(**fixed_batch(tokenizer)).logits


def _check_resume(ranks):
    for rank in ranks:
        assert list(rank["losses_b"]) == ["1", "2", "3", "4"]  # every step once: nothing lost, nothing repeated
        assert rank["losses_b"] == pytest.approx(rank["losses_a"], rel=1e-5)


@needs_deepspeed
@pytest.mark.slow
def test_zero2_full_finetune_of_experts_and_router(tiny_model_dir, tmp_path):
    """ZeRO-2 with a freezing preset (experts + router in full), z-loss on: resume, consolidated model."""
    import torch

    model_dir = tiny_model_dir("mixtral")
    recipe = _recipe(tmp_path, model_dir, distributed={"strategy": "zero2"}, freeze={"train": ["experts", "router"]},
                     moe={"z_loss_coef": 0.001})
    # With the flag that CPU DDP needs (docs/upstream.md#accelerate-cpu), which would otherwise turn ZeRO into DDP.
    ranks = _launch(tmp_path, recipe, env_extra={"ACCELERATE_USE_CPU": "true"})
    for rank in ranks:
        assert (rank["distributed_type"], rank["zero_stage"], rank["world_size"]) == ("DEEPSPEED", 2, 2)
        assert rank["engine"] == "DeepSpeedEngine" and rank["backend"] == "gloo"
        assert rank["ds_params"] == 0 and rank["sharding"] is None  # ZeRO-2 keeps whole weights on every rank
    _check_resume(ranks)
    out = tmp_path / "out" / "a"
    assert json.loads((out / "metrics.json").read_text())["z_loss"] > 0
    reloaded = _one_process_logits(model_dir, out, starved=False, adapter=False)
    for r in (0, 1):
        torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4, atol=1e-4)
    base = _one_process_logits(model_dir, model_dir, starved=False, adapter=False)
    assert not torch.allclose(base, reloaded, atol=1e-3)  # the saved model is the trained one, not the base


@needs_deepspeed
@pytest.mark.slow
def test_zero2_qlora_with_expert_lora(tiny_model_dir, tmp_path):
    """4-bit base (experts included) + LoRA on attention and experts under ZeRO-2: resume, consolidated adapter."""
    import torch

    model_dir = tiny_model_dir("mixtral")
    recipe = _recipe(tmp_path, model_dir, distributed={"strategy": "zero2"}, quantization={"bits": 4},
                     lora={"r": 4, "targets": ["attention", "experts"]})
    ranks = _launch(tmp_path, recipe)
    for rank in ranks:
        assert (rank["distributed_type"], rank["zero_stage"], rank["world_size"]) == ("DEEPSPEED", 2, 2)
        assert rank["engine"] == "DeepSpeedEngine" and rank["ds_params"] == 0
    _check_resume(ranks)
    out = tmp_path / "out" / "a"
    # TRL trains LoRA on a 4-bit base in bf16 (the saved adapter too): compare in the precision that trained.
    assert ranks[0]["trainable_dtypes"] == ["bfloat16"]
    reloaded = _one_process_logits(model_dir, out, starved=False, adapter=True, quantization={"bits": 4},
                                   adapter_dtype=torch.bfloat16)
    for r in (0, 1):
        torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4, atol=1e-4)


@needs_deepspeed
@pytest.mark.slow
def test_zero3_expert_lora_with_a_rank_whose_experts_get_no_tokens(tiny_model_dir, tmp_path):
    """ZeRO-3, LoRA on attention and experts; rank 1 never routes to experts 2 and 3 (DeepSpeed #4808 setting),
    with no MoE leaf modules. No hang; each rank's logits equal one process's (same routing) from the saved adapter.
    """
    import torch

    model_dir = tiny_model_dir("mixtral")
    recipe = _recipe(tmp_path, model_dir, distributed={"strategy": "zero3"},
                     lora={"r": 4, "targets": ["attention", "experts"]})
    ranks = _launch(tmp_path, recipe, "--starve-rank1")
    for rank in ranks:
        assert (rank["distributed_type"], rank["zero_stage"], rank["world_size"]) == ("DEEPSPEED", 3, 2)
        # Every parameter is DeepSpeed-partitioned; each rank holds about half of the elements.
        assert rank["ds_params"] == rank["params"] > 0
        assert rank["ds_local_numel"] <= rank["ds_full_numel"] // 2 + rank["params"]
        assert rank["z3_leaves"] == [] and rank["sharding"].startswith("ZeRO-3:")
    _check_resume(ranks)
    out = tmp_path / "out" / "a"
    assert (out / "adapter_model.safetensors").is_file()
    for r, starved in ((0, False), (1, True)):
        reloaded = _one_process_logits(model_dir, out, starved=starved, adapter=True)
        torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4, atol=1e-4)


@needs_deepspeed
@pytest.mark.slow
def test_zero3_full_finetune_with_a_rank_whose_experts_get_no_tokens(tiny_model_dir, tmp_path):
    """ZeRO-3 training experts and router in full while rank 1 starves experts 2 and 3.

    With DeepSpeed's default MoE leaf (MixtralSparseMoeBlock) this fails in backward ("size of tensor a (0) must
    match"); without leaves it trains, resumes and saves one consolidated model.
    """
    import torch

    model_dir = tiny_model_dir("mixtral")
    recipe = _recipe(tmp_path, model_dir, distributed={"strategy": "zero3"}, freeze={"train": ["experts", "router"]})
    ranks = _launch(tmp_path, recipe, "--starve-rank1")
    for rank in ranks:
        assert (rank["distributed_type"], rank["zero_stage"], rank["world_size"]) == ("DEEPSPEED", 3, 2)
        assert rank["ds_params"] == rank["params"] > 0 and rank["z3_leaves"] == []
    _check_resume(ranks)
    out = tmp_path / "out" / "a"
    for r, starved in ((0, False), (1, True)):
        reloaded = _one_process_logits(model_dir, out, starved=starved, adapter=False)
        torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4, atol=1e-4)
