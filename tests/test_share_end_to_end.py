"""A real training run, then what the recipe runner does after saving (portable adapter, model card, serving
warning), then every way of using it: plain PEFT from elsewhere, chat/generate's loader, merge."""

import json

import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM
from tiny_runs import DEMO_TRAIN

from moetune.adapters import load_adapter
from moetune.config import ModelSection, QuantizationSection
from moetune.inference import load_for_inference
from moetune.loading import load_model
from moetune.merging import merge_run, serving_warning
from moetune.training import finetune


def test_qlora_run_is_usable_everywhere(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("mixtral")
    monkeypatch.chdir(model_dir.parent)  # train with a relative base path, as users do
    recipe = {
        "model": {"name_or_path": model_dir.name, "dtype": "float32"},
        "quantization": {},
        "lora": {"r": 4, "targets": ["experts", "attention"]},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                  "disable_tqdm": True, "seed": 0},
        "output": {"dir": str(tmp_path / "out")},
    }
    out, metrics = finetune(recipe)  # writes the portable adapter and the card itself
    card = ModelCard.load(out / "README.md")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(model_dir.resolve())
    warning = serving_warning(out)
    assert "vLLM" in warning and "moetune merge" in warning
    assert card.data.library_name == "peft" and "routing.png" in card.text and "train_loss" in card.text

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ids = torch.randint(6, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
        section = ModelSection(name_or_path=str(model_dir), dtype="float32")
        reference = load_adapter(load_model(section)[0], out)(ids).logits
        # Expert LoRA: moetune computes it the split way, plain PEFT folds it; same function, other rounding.
        torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-4)

        model, _ = load_for_inference(out)  # as trained: 4-bit base
        assert model.base_model.model.is_loaded_in_4bit
        as_trained = load_adapter(load_model(section, QuantizationSection())[0], out)(ids).logits
        torch.testing.assert_close(model(ids).logits, as_trained, atol=0, rtol=0)

    report = merge_run(out, tmp_path / "merged", "float32")
    assert report.ok and report.sample_source == DEMO_TRAIN


def test_a_bf16_qlora_run_generates(tiny_model_dir, tmp_path):
    """A 4-bit run in bf16 loads for inference with its fp32 router routing in fp32, as training had it."""
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir("mixtral")), "dtype": "bfloat16"},
        "quantization": {},
        "lora": {"r": 4, "targets": ["attention"]},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "train": {"max_steps": 1, "per_device_train_batch_size": 2, "disable_tqdm": True},
        "output": {"dir": str(tmp_path / "out")},
    }
    out, _ = finetune(recipe)
    model, tokenizer = load_for_inference(out)
    ids = torch.tensor([tokenizer("What day comes after Monday?")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()
