"""Run dirs as a LoRA training run leaves them, built in seconds: tiny model, a few optimizer steps on random
tokens, `save_pretrained`, the resolved recipe.yaml and a metrics.json (no trainer, no data pipeline)."""

import json
from pathlib import Path

import torch

from moetune.adapters import add_adapters
from moetune.config import dump_recipe, load_recipe
from moetune.freezing import freeze, modules_trained_in_full
from moetune.loading import load_model
from moetune.portable_adapters import make_adapter_portable


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN, DEMO_EVAL = str(REPO / "recipes/data/demo_train.jsonl"), str(REPO / "recipes/data/demo_eval.jsonl")


def run_recipe(model_dir: Path, out: Path, *, targets=("attention",), train_in_full=None, quantized=False,
               dtype="float32") -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        **({"quantization": {}} if quantized else {}),
        "lora": {"r": 4, "targets": list(targets)},
        "freeze": {"train": train_in_full},
        "data": {"train": DEMO_TRAIN, "eval": DEMO_EVAL, "max_length": 64},
        "output": {"dir": str(out)},
    }


def make_run(out: Path, model_dir: Path, *, targets=("attention",), train_in_full=None, quantized=False,
             dtype="float32", steps=3, lr=5e-2, seed=0, portable=True) -> Path:
    """A LoRA run dir in `out`: adapter (+ modules trained in full), tokenizer, recipe.yaml, metrics.json."""
    recipe = load_recipe(run_recipe(model_dir, out, targets=targets, train_in_full=train_in_full,
                                    quantized=quantized, dtype=dtype))
    torch.manual_seed(seed)
    model, tokenizer = load_model(recipe.model, recipe.quantization)
    in_full = modules_trained_in_full(model, recipe.freeze) if train_in_full else []
    model = add_adapters(model, recipe.lora, modules_to_save=in_full)
    freeze(model, recipe.freeze, lora_enabled=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # lora_B starts at 0: it takes a step before the adapter changes anything
        ids = torch.randint(6, 400, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"train_loss": 5.5, "eval_loss": 5.1, "global_step": steps}))
    if portable:
        make_adapter_portable(out)
    return out
