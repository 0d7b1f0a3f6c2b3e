"""The recipe runner: output layout, reload, output-dir protection, resume, SFTConfig defaults, the demo."""

import json
import re
from pathlib import Path

import pytest
import torch

from moetune.config import load_recipe
from moetune.errors import RecipeError
from moetune.training import finetune, sft_config


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN, DEMO_EVAL = str(REPO / "recipes/data/demo_train.jsonl"), str(REPO / "recipes/data/demo_eval.jsonl")


@pytest.fixture
def recipe(tiny_model_dir, tmp_path):
    """A small LoRA recipe on the tiny Mixtral: a few steps on the demo data."""
    return {
        "model": {"name_or_path": str(tiny_model_dir("mixtral")), "dtype": "float32"},
        "lora": {"r": 4, "targets": ["attention"]},
        "moe": {"z_loss_coef": 0.001},
        "data": {"train": DEMO_TRAIN, "eval": DEMO_EVAL, "max_length": 64},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 64,
                  "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2, "seed": 0, "disable_tqdm": True},
        "output": {"dir": str(tmp_path / "out")},
    }


def eval_loss_of(model, loaded_eval, pad_id):
    """Token-mean NLL over the whole eval set (the trainer's eval_loss with one eval batch)."""
    rows = list(loaded_eval)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                           + [-100] * (width - len(r["input_ids"])) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss.item()


def test_lora_run_writes_hf_layout_and_reloads(recipe, tmp_path):
    out, metrics = finetune(recipe)
    assert out == tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json",
                 "trainer_state.json", "data_report.json", "routing.json", "checkpoint-4"):
        assert (out / name).exists(), name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"train_loss", "eval_loss_start", "eval_loss", "train_tokens", "train_runtime_s", "aux_loss", "z_loss"} <= set(metrics)
    assert metrics["train_tokens"] > 0 and metrics["aux_loss"] > 0 and metrics["z_loss"] > 0
    assert metrics["eval_loss"] < metrics["eval_loss_start"]
    # recipe.yaml is the resolved recipe: it validates and equals what ran
    assert load_recipe(out / "recipe.yaml") == load_recipe(recipe)

    # The saved adapter, loaded onto a fresh base, reproduces the run's final eval loss (and the base does not).
    from moetune.adapters import load_adapter
    from moetune.config import DataSection
    from moetune.data import load_datasets
    from moetune.loading import load_model

    rec = load_recipe(recipe)
    base, tok = load_model(rec.model)
    loaded = load_datasets(DataSection(train=DEMO_EVAL, max_length=64), tok).train
    assert eval_loss_of(base, loaded, tok.pad_token_id) == pytest.approx(metrics["eval_loss_start"], rel=1e-5)
    tuned = load_adapter(base, out)
    assert eval_loss_of(tuned, loaded, tok.pad_token_id) == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_resume_continues_the_same_loss_trajectory(recipe, tmp_path, monkeypatch):
    recipe["train"]["max_steps"] = 6
    recipe["train"]["save_steps"] = 3
    _, full = finetune(recipe, overrides=[f"output.dir={tmp_path / 'a'}"])

    from moetune.trainer import MoETrainer

    original, calls = MoETrainer.training_step, []

    def crash_on_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MoETrainer, "training_step", crash_on_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe, overrides=[f"output.dir={tmp_path / 'b'}"])
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-3"]
    monkeypatch.setattr(MoETrainer, "training_step", original)
    _, resumed = finetune(recipe, overrides=[f"output.dir={tmp_path / 'b'}"], resume=True)

    def losses(run):
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    assert list(losses("b")) == [1, 2, 3, 4, 5, 6]  # every step once: nothing lost, nothing repeated
    assert losses("b") == pytest.approx(losses("a"), rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    assert resumed["train_tokens"] == full["train_tokens"]


def test_sft_config_defaults_and_overrides(recipe):
    args = sft_config(load_recipe(recipe), has_eval=True)
    assert args.use_cpu and not args.bf16 and not args.activation_checkpointing and args.report_to == []
    assert args.max_length == 64 and args.completion_only_loss and not args.assistant_only_loss and args.learning_rate == 5e-3
    args = sft_config(load_recipe(recipe, ["model.dtype=bfloat16", "data.packing=true"]), has_eval=True)
    assert args.bf16 and args.packing and args.padding_free
    args = sft_config(load_recipe(recipe, ["model.dtype=bfloat16", "train.bf16=false", "train.gradient_checkpointing=true"]),
                      has_eval=True)
    assert not args.bf16 and args.activation_checkpointing
    with pytest.raises(RecipeError, match="`train` is not a valid trl.SFTConfig"):
        sft_config(load_recipe(recipe, ["train.lr_scheduler_type=sideways"]), has_eval=True)


def test_packing_and_qlora_run(recipe, tmp_path):
    recipe["train"]["max_steps"] = 2
    _, metrics = finetune(recipe, overrides=["data.packing=true", f"output.dir={tmp_path / 'packed'}"])
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0
    _, metrics = finetune(recipe, overrides=["quantization.bits=4", "model.dtype=bfloat16", f"output.dir={tmp_path / 'q'}"])
    assert metrics["global_step"] == 2 and (tmp_path / "q" / "adapter_model.safetensors").is_file()


def _run_demo(tiny_model_dir, tmp_path, monkeypatch, *overrides):
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository root
    model = tiny_model_dir("mixtral", hidden_size=128)  # what `moetune tiny mixtral runs/tiny-mixtral --hidden-size 128` writes
    return finetune(REPO / "recipes/demo.yaml", overrides=[
        f"model.name_or_path={model}", f"output.dir={tmp_path / 'demo'}", "train.disable_tqdm=true", *overrides])[1]


def test_demo_recipe_learns_fast_variant(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """recipes/demo.yaml cut to 40 steps: eval loss already falls far below its start; samples are printed."""
    metrics = _run_demo(tiny_model_dir, tmp_path, monkeypatch, "train.max_steps=40", "train.warmup_steps=5",
                        "output.sample_prompts=1")
    assert metrics["eval_loss"] < 0.6 * metrics["eval_loss_start"]
    printed = capsys.readouterr().out
    assert "Sample generations before training:" in printed and "Sample generations after training:" in printed
    assert printed.count("expected:") == 2 and "(eval_loss_start=" in printed


@pytest.mark.slow
def test_demo_recipe_as_shipped(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The whole demo (6 epochs): eval loss ends below a tenth of its start and the answers come out right."""
    metrics = _run_demo(tiny_model_dir, tmp_path, monkeypatch)
    assert metrics["eval_loss"] < 0.1 * metrics["eval_loss_start"]
    after = capsys.readouterr().out.split("Sample generations after training:")[1]
    pairs = re.findall(r"expected:  (.*)\n  generated: (.*)", after)
    assert len(pairs) == 3 and sum(e == g for e, g in pairs) >= 2  # recipes/demo.yaml: sample_prompts 3
