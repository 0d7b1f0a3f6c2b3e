"""`distributed.expert_parallel: N`: the recipe rules (fast) and a real 2-rank run over gloo (slow)."""

import json
import sys
from pathlib import Path

import pytest

from moetune.config import load_recipe
from moetune.errors import RecipeError


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_distributed_deepspeed import _check_resume, _launch, _one_process_logits, _recipe  # noqa: E402  (one launch helper)


def _ep(tmp_path, n=2, **sections):
    return load_recipe(_recipe(tmp_path, "m", distributed={"expert_parallel": n, **sections.pop("distributed", {})},
                               **sections))


# ------------------------------------------------------------------------------------------ fast: recipe rules


def test_one_means_no_distributed_config(tmp_path):
    from moetune.expert_parallel import distributed_config, trainer_arguments

    recipe = _ep(tmp_path, 1)
    assert distributed_config(recipe, 4) is None and trainer_arguments(recipe, 4, resume=True) == {}


def test_one_process_ignores_the_section(tmp_path):
    """`moetune validate` and single-process runs hold every expert; the world-size rule applies only to several."""
    from moetune.expert_parallel import distributed_config, trainer_arguments

    recipe = _ep(tmp_path, 2)
    assert distributed_config(recipe, 1) is None and trainer_arguments(recipe, 1, resume=True) == {}


def test_distributed_config_is_fsdp_over_all_ranks_with_ep(tmp_path):
    from moetune.expert_parallel import distributed_config

    config = distributed_config(_ep(tmp_path, 2), 4)
    assert (config.fsdp_size, config.ep_size) == (4, 2)
    assert config.tp_size in (None, 1)  # TP needs a tp_plan many families lack, and does not train on CPU


@pytest.mark.parametrize("n, world, sections, match", [
    (3, 4, {}, r"`distributed.expert_parallel`=3 must divide the number of processes launched \(4\); allowed: \[1, 2, 4\]"),
    (2, 2, {"distributed": {"strategy": "zero3"}}, r"`distributed.expert_parallel`=2 .* distributed.strategy='zero3'"),
    (2, 2, {"distributed": {"strategy": "ddp"}}, r"cannot be combined with distributed.strategy='ddp'"),
    (2, 2, {"quantization": {"bits": 4}, "lora": {"r": 4}}, r"cannot be combined with `quantization` \(4-bit\)"),
    (2, 2, {"lora": {"r": 4, "targets": ["attention", "experts"]}}, r"`lora.targets` includes experts"),
    (2, 2, {"lora": {"r": 4}, "freeze": {"train": ["router"]}}, r"`freeze.train` / `freeze.include` beside `lora`"),
    (2, 2, {"experts": {}}, r"`experts` \(ESFT\) cannot be combined with `distributed.expert_parallel`=2"),
])
def test_invalid_expert_parallel_is_named(tmp_path, n, world, sections, match):
    from moetune.expert_parallel import check_expert_parallel

    with pytest.raises(RecipeError, match=match):
        check_expert_parallel(_ep(tmp_path, n, **sections), world)


def test_model_checks_experts_count_and_family_plan(tmp_path, tiny_model_dir):
    from moetune.expert_parallel import check_expert_parallel
    from moetune.loading import read_config

    mixtral = read_config(str(tiny_model_dir("mixtral")))  # 4 experts
    check_expert_parallel(_ep(tmp_path, 4), 4, mixtral)
    with pytest.raises(RecipeError, match=r"must divide the model's 4 experts per layer; allowed: \[1, 2, 4\]"):
        check_expert_parallel(_ep(tmp_path, 8), 8, mixtral)
    dbrx = read_config(str(tiny_model_dir("dbrx")))  # a family without an expert-parallel plan in transformers
    with pytest.raises(RecipeError, match=r"no expert-parallel plan for model_type 'dbrx'"):
        check_expert_parallel(_ep(tmp_path, 2), 2, dbrx)


def test_check_recipe_refuses_before_loading_weights(tmp_path, tiny_model_dir, monkeypatch):
    """`moetune validate` / the start of `train` read the model's config.json only: 8 shards of 4 experts fail."""
    import moetune.loading
    from moetune.training import check_recipe

    monkeypatch.setattr(moetune.loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir("mixtral"), distributed={"expert_parallel": 8}))
    with pytest.raises(RecipeError, match=r"must divide the model's 4 experts per layer"):
        check_recipe(recipe)


def test_trainer_writes_the_model_and_moetune_the_rest_also_on_resume(tmp_path):
    """transformers refuses to checkpoint a model sharded at load time without save_only_model; MoETrainer adds the
    optimizer, scheduler and RNG states itself (moetune/ep_checkpoint.py), so --resume is allowed."""
    from moetune.expert_parallel import trainer_arguments
    from moetune.training import sft_config

    recipe = _ep(tmp_path, 2)
    assert trainer_arguments(recipe, 2) == trainer_arguments(recipe, 2, resume=True) == {"save_only_model": True}
    assert sft_config(recipe, has_eval=False).save_only_model is False  # this test is one process


def test_weights_only_checkpoint_of_an_older_moetune_is_refused_on_resume(tmp_path):
    """Without ep_state/ a resume would restart the optimizer and schedule: refused instead (cheap, no ranks)."""
    from types import SimpleNamespace

    from moetune.errors import MoetuneError
    from moetune.trainer import MoETrainer

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"")
    trainer = SimpleNamespace(is_distributed_loading_by_transformers=True)
    with pytest.raises(MoetuneError, match=r"holds the weights only .* start the run again instead of --resume"):
        MoETrainer._load_from_checkpoint(trainer, str(checkpoint))


def test_describe_sharding_is_none_on_one_process(tiny_model_dir):
    from moetune.expert_parallel import describe_sharding
    from moetune.loading import load_model

    model, _ = load_model(str(tiny_model_dir("qwen3_moe")), with_tokenizer=False)
    assert describe_sharding(model) is None


# ------------------------------------------------------------------------------------ slow: 2 ranks over gloo


@pytest.mark.slow
def test_expert_parallel_with_lora_on_attention_saves_one_adapter(tiny_model_dir, tmp_path):
    """Mixtral, LoRA on attention (the expert weights stay frozen and sharded): exact resume, one consolidated adapter."""
    import torch

    model_dir = tiny_model_dir("mixtral")
    recipe = _recipe(tmp_path, model_dir, distributed={"expert_parallel": 2}, lora={"r": 4, "targets": ["attention"]})
    ranks = _launch(tmp_path, recipe)
    for rank in ranks:
        assert (rank["world_size"], rank["distributed_type"], rank["engine"]) == (2, "MULTI_CPU", "PeftModelForCausalLM")
        assert (rank["expert_dtensor"], rank["expert_local_rows"], rank["expert_full_rows"]) == (4, [2], [4])
    assert ranks[1]["losses_a"] == ranks[0]["losses_a"]
    _check_resume(ranks)
    for run in ("a", "b"):
        reloaded = _one_process_logits(model_dir, tmp_path / "out" / run, starved=False, adapter=True)
        for r in (0, 1):
            torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.slow
def test_expert_parallel_with_fsdp_trains_experts_and_saves_one_model(tiny_model_dir, tmp_path):
    """Qwen3-MoE, experts and router trained in full, each rank holding 2 of the 4 experts per layer: --resume from
    checkpoint-2 repeats the uninterrupted run's losses and ends with the same model."""
    import torch

    model_dir = tiny_model_dir("qwen3_moe")
    recipe = _recipe(tmp_path, model_dir, distributed={"expert_parallel": 2}, freeze={"train": ["experts", "router"]},
                     moe={"z_loss_coef": 0.001})
    ranks = _launch(tmp_path, recipe)
    for rank in ranks:
        assert (rank["world_size"], rank["num_processes"], rank["backend"]) == (2, 2, "gloo")
        # Sharded at load time by transformers (FSDP2's fully_shard class, composed with EP); accelerate neither
        # wraps it in DDP nor shards it again, so its own state stays MULTI_CPU.
        assert rank["distributed_type"] == "MULTI_CPU" and rank["engine"] == "FSDPQwen3MoeForCausalLM"
        assert rank["expert_params"] == rank["expert_dtensor"] == 4  # gate_up_proj + down_proj, 2 layers
        assert (rank["expert_local_rows"], rank["expert_full_rows"]) == ([2], [4])
        assert rank["sharding"].startswith("experts sharded: 2 of 4 per layer")
    losses = ranks[0]["losses_a"]
    assert list(losses) == ["1", "2", "3", "4"] and ranks[1]["losses_a"] == losses
    _check_resume(ranks)
    checkpoint = tmp_path / "out" / "a" / "checkpoint-2"
    assert {"ep_state", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    for run in ("a", "b"):  # the uninterrupted and the resumed run end with the same model
        out = tmp_path / "out" / run
        assert json.loads((out / "metrics.json").read_text())["z_loss"] > 0
        reloaded = _one_process_logits(model_dir, out, starved=False, adapter=False)  # all 4 experts, one process
        for r in (0, 1):
            torch.testing.assert_close(reloaded, torch.load(tmp_path / "report" / f"logits{r}.pt"), rtol=1e-4,
                                       atol=1e-4)
    base = _one_process_logits(model_dir, model_dir, starved=False, adapter=False)
    assert not torch.allclose(base, reloaded, atol=1e-3)


def _train(tmp_path, recipe: dict, ranks: int, *flags: str) -> None:
    import os
    import subprocess

    import yaml
    from launch_helpers import failure_text, free_port

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "-m", "moetune", "train", str(path), *flags]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, failure_text(run)


@pytest.mark.slow
def test_a_resume_on_fewer_ranks_reads_every_expert_back_where_it_was(tiny_model_dir, tmp_path):
    """Written by 4 ranks (experts 2 per rank, 2 ranks per expert shard), resumed by 2: the checkpoint's DCP shards
    are resharded onto the new mesh. At learning rate 0 the resumed run must end with exactly the checkpoint's
    weights, expert by expert (a shard read into the wrong rank's experts would change them)."""
    import json

    import torch

    from moetune.config import ModelSection
    from moetune.loading import load_model

    def weights(path):  # the final model is saved per expert, checkpoints fused: compare what loads
        model = load_model(ModelSection(name_or_path=str(path), dtype="float32"), with_tokenizer=False)[0]
        return {name: p.detach() for name, p in model.named_parameters()}

    recipe = _recipe(tmp_path, tiny_model_dir("qwen3_moe"), distributed={"expert_parallel": 2},
                     freeze={"train": ["experts", "router"]})
    recipe["train"].update(max_steps=2)
    _train(tmp_path, recipe, 4)
    out = tmp_path / "out"
    written = weights(out / "checkpoint-2")
    _train(tmp_path, recipe, 2, "--resume", "--set", "train.max_steps=3", "--set", "train.learning_rate=0.0")
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
    resumed = weights(out)
    assert resumed.keys() == written.keys() and any(".experts." in key for key in written)
    assert not torch.equal(written[next(k for k in written if ".experts." in k)],
                           weights(tiny_model_dir("qwen3_moe"))[next(k for k in written if ".experts." in k)])
    for key, value in written.items():
        assert torch.equal(resumed[key], value), key
