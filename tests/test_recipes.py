"""Every shipped recipe validates offline, builds a real SFTConfig, and has a header that matches the file."""

import importlib
import re
import runpy
from pathlib import Path

import pytest
import yaml

from moetune.config import load_recipe


REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "granitemoe",
            "granitemoeshared", "phimoe", "jamba", "glm4_moe", "qwen3_next")


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _load(path: Path, tiny_model_dir):
    """Validate as `moetune validate` would, from the repository root. A recipe that names a local model dir (the
    demo's `./runs/tiny-mixtral`, made by `moetune tiny`) gets a tiny model built here instead."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if raw["model"]["name_or_path"].startswith("."):
        overrides.append(f"model.name_or_path={tiny_model_dir('mixtral', hidden_size=128)}")
    return load_recipe(path, overrides)


def test_recipes_exist():
    names = {_name(p) for p in RECIPES}
    assert "recipes/demo.yaml" in names and len(names) >= 7
    assert {p.stem for p in ACCELERATE} == {"single_gpu", "ddp", "fsdp2", "zero2", "zero3"}


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_validates_and_builds_sft_config(path, tiny_model_dir, monkeypatch):
    from moetune.training import sft_config

    monkeypatch.chdir(REPO)
    recipe = _load(path, tiny_model_dir)
    args = sft_config(recipe, has_eval=recipe.data.eval is not None)  # every `train` value is a valid SFTConfig
    assert args.output_dir == recipe.output.dir and args.max_length == recipe.data.max_length


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_header(path):
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.startswith("# "), "a recipe opens with its header comment"
    assert f"moetune train {_name(path)}" in header, "the header's command names this very file"
    assert "Memory" in header and "Why" in header or path.name == "demo.yaml"
    for launch in re.findall(r"accelerate launch --config_file (\S+)(.*)", header):
        config, rest = launch
        assert (REPO / config).is_file(), config
        assert _name(path) in rest, "the accelerate command names this very file"
    if path.name != "demo.yaml":
        assert "recipes/accelerate/" in header
    for cls in re.findall(r"--deepspeed_moe_layer_cls_names (\w+)", header):
        assert _transformers_class(cls), f"{cls} is not a transformers class"


def _transformers_class(name: str) -> bool:
    return any(hasattr(importlib.import_module(f"transformers.models.{f}.modeling_{f}"), name) for f in FAMILIES)


@pytest.mark.parametrize("path", ACCELERATE, ids=_name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # a dataclass: unknown keys raise
    assert path.read_text().startswith("# ")
    assert f"--config_file {_name(path)}" in path.read_text()
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config  # the model's _no_split_modules
    if path.stem == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
        # No MoE leaf blocks: they break full fine-tuning of fused experts (docs/upstream.md#deepspeed-zero3-moe).
        assert "deepspeed_moe_layer_cls_names" not in config.deepspeed_config
        for cls in re.findall(r"\b(\w+(?:SparseMoeBlock|Moe|MoE|MLP))\b", path.read_text()):
            assert _transformers_class(cls), cls


def test_demo_data_is_what_the_script_writes(tmp_path):
    script = REPO / "scripts" / "make_demo_data.py"
    module = runpy.run_path(str(script))
    for name, n, seed in (("demo_train.jsonl", 600, 0), ("demo_eval.jsonl", 48, 1)):
        module["write"](tmp_path / name, n, seed)
        assert (tmp_path / name).read_bytes() == (REPO / "recipes" / "data" / name).read_bytes()
