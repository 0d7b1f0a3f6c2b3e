"""README.md of a run dir: Hub metadata through ModelCardData, the method, parameters, metrics, routing, a snippet
that runs; robust to missing optional files."""

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_runs import make_run

from moetune.config import dump_recipe, load_recipe
from moetune.model_card import write_model_card
from moetune.routing_report import write_routing_report


ROUTING = {
    "model_type": "mixtral", "tokens": 1234, "warnings": ["layer 1: experts [2, 3] received no tokens"],
    "layers": [
        {"layer": 0, "share": [0.4, 0.3, 0.2, 0.1], "max_over_mean": 1.6, "cv": 0.45, "dead_experts": []},
        {"layer": 1, "share": [0.5, 0.5, 0.0, 0.0], "max_over_mean": 2.0, "cv": 1.0, "dead_experts": [2, 3]},
    ],
}


@pytest.fixture(scope="module")
def licensed_base(tiny_model_dir):
    base = tiny_model_dir("mixtral", max_position_embeddings=256)  # a directory of this module's own
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return base


def test_adapter_card(licensed_base, tmp_path):
    run = make_run(tmp_path / "run", licensed_base, targets=["experts", "attention"], train_in_full=["router"],
                   quantized=True, steps=1)
    recipe = load_recipe(run / "recipe.yaml").model_dump()
    recipe["data"]["train"] = "tatsu-lab/alpaca:train"  # a Hub dataset
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe)))
    write_routing_report(ROUTING, run)

    card = ModelCard.load(write_model_card(run))
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert card.data.tags == ["moe", "moetune", "mixtral", "lora"]
    assert card.data.datasets == ["tatsu-lab/alpaca"]
    assert card.data.base_model is None  # a local base is named in the text, not as a Hub id
    text = card.text
    for expected in ("4-bit nf4 base", "LoRA: r=4, alpha=32", "targets: experts, attention", "Trained in full: router",
                     "fp32 router", "Expert dropout: 0", "| experts | 7,168 | 0 |", "| router | 0 | 512 |",
                     "| train_loss | 5.5 |", "![Share of routed slots", "most imbalanced MoE layer is layer 1",
                     "Dead experts: layer 1: [2, 3]", "experts [2, 3] received no tokens",
                     f'AutoPeftModelForCausalLM.from_pretrained("{run.resolve()}"', "trained against the 4-bit base",
                     "vLLM", f"`{licensed_base.resolve()}`"):
        assert expected in text, expected


def test_card_without_optional_files(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir("olmoe"), targets=["attention"], steps=1)
    for name in ("recipe.yaml", "metrics.json"):
        (run / name).unlink()
    card = ModelCard.load(write_model_card(run))
    assert card.data.library_name == "peft" and card.data.tags == ["moe", "moetune", "olmoe", "lora"]
    assert "## Method" not in card.text and "## Metrics" not in card.text and "## Routing" not in card.text
    assert "| attention |" in card.text and "AutoPeftModelForCausalLM" in card.text


def test_full_model_card(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir("qwen3_moe"), run)
    recipe = load_recipe({"model": {"name_or_path": str(run)}, "freeze": {"train": ["non_experts"]},
                          "data": {"train": "tatsu-lab/alpaca"}, "output": {"dir": str(run)}})
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    card = ModelCard.load(write_model_card(run, repo_id="me/qwen3-tiny"))
    assert card.data.library_name == "transformers" and "lora" not in card.data.tags
    assert "Trained in full: non_experts" in card.text and "| attention | 0 |" in card.text
    assert "| experts |" not in card.text  # frozen by non_experts
    assert 'AutoModelForCausalLM.from_pretrained("me/qwen3-tiny"' in card.text


def test_card_snippet_runs(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir("qwen3_moe"), targets=["experts"], steps=1)
    text = ModelCard.load(write_model_card(run)).text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0].replace("max_new_tokens=64", "max_new_tokens=4")
    exec(compile(snippet, "card snippet", "exec"), {"torch": torch, "print": lambda *args: None})  # noqa: S102
