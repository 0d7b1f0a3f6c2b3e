"""Recipe loading: YAML + overrides -> Recipe; every mistake named by its dotted key, all reported at once."""

import subprocess
import sys
import time

import pytest
import yaml

from moetune.config import load_recipe, sft_config_fields
from moetune.errors import RecipeError


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A valid recipe dict whose files exist, run from a scratch dir (the tests change one thing at a time)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "notes.txt").write_text("hello\n")
    return {
        "model": {"name_or_path": "org/some-moe"},
        "data": {"train": "train.jsonl"},
        "output": {"dir": str(tmp_path / "out")},
    }


def problems(source, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return str(info.value)


def test_valid_recipe_gets_defaults_and_yaml12_floats(base, tmp_path):
    base["train"] = {"learning_rate": "placeholder"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base).replace("placeholder", "1e-4"))
    recipe = load_recipe(path)
    assert recipe.train["learning_rate"] == pytest.approx(1e-4)  # PyYAML alone would give the string '1e-4'
    assert recipe.moe.aux_loss and recipe.lora is None and recipe.data.format == "auto"


def test_overrides_are_yaml_typed_create_and_remove_sections(base):
    base["lora"] = {"r": 4}
    recipe = load_recipe(base, ["lora.r=32", "lora.targets=[attention, experts]", "train.learning_rate=2e-4",
                                "quantization.bits=4", "moe.telemetry=false"])
    assert recipe.lora.r == 32 and recipe.lora.targets == ["attention", "experts"]
    assert recipe.train == {"learning_rate": 2e-4}
    assert recipe.quantization is not None and recipe.moe.telemetry is False
    assert load_recipe(base, ["lora=null"]).lora is None
    assert base["lora"] == {"r": 4}  # the caller's dict is not modified


def test_recipe_object_revalidated_with_overrides(base):
    recipe = load_recipe(base)
    assert load_recipe(recipe, ["data.max_length=64"]).data.max_length == 64
    assert recipe.data.max_length == 1024


# (mutation of the valid recipe or overrides, expected fragment of the message)
MISTAKES = [
    ({"lora": {"targets": ["attention"]}, "freeze": {"train": ["non_experts"]}}, [],
     "`freeze.train` ['non_experts'] trains ['attention'] in full while `lora.targets` adapts it"),
    ({"lorra": {"r": 8}}, [], "unknown key `lorra` (did you mean `lora`?)"),
    ({"lora": {"rank": 8}}, [], "unknown key `lora.rank` (did you mean `r`?)"),
    ({"lora": {"r": "sixteen"}}, [], "`lora.r`: input should be a valid integer"),
    ({"lora": {"r": 0}}, [], "`lora.r`: input should be greater than 0 (got 0)"),
    ({"model": {"name_or_path": "x/y", "dtype": "bf16"}}, [], "`model.dtype`: got 'bf16'; allowed: 'bfloat16', 'float16' or 'float32'"),
    ({"data": {}}, [], "`data.train` is required"),
    ({"data": {"train": "nowhere/train.jsonl"}}, [], "`data.train`: data file 'nowhere/train.jsonl' not found"),
    ({"data": {"train": "not a dataset!"}}, [], "`data.train`: 'not a dataset!' is neither a local"),
    ({"data": {"train": "notes.txt"}}, [], "`data.train`: 'notes.txt' has an unsupported file type; allowed: .jsonl"),
    ({"train": {"learning_rte": 1e-4}}, [], "unknown key `train.learning_rte` (did you mean `learning_rate`?)"),
    ({"train": {"max_length": 512}}, [], "`train.max_length`: set it with data.max_length instead"),
    ({"output": {"dir": "o", "push_to_hub": True}}, [], "`output.hub_repo_id` is required when `output.push_to_hub` is true"),
    ({"lora": {"dropout": 0.05, "targets": ["attention", "experts"]}}, [], "`lora.dropout` must be 0 when `lora.targets` includes experts (got 0.05)"),
    ({"lora": {"targets": ["expert"]}}, [], "`lora.targets`: 'expert' is not a group (did you mean `experts`?)"),
    ({"freeze": {"train": ["non_expert"]}}, [], "`freeze.train`: unknown group or preset 'non_expert' (did you mean `non_experts`?)"),
    ({"freeze": {"include": ["(oops"]}}, [], "`freeze.include`: '(oops' is not a valid regular expression"),
    ({"model": {"name_or_path": "./no/such/model"}}, [], "`model.name_or_path`: local model directory './no/such/model' not found"),
    ({"quantization": {"bits": 4}}, [], "`quantization` needs a `lora` section"),
    ({"moe": {"router_jitter": 1.5}}, [], "`moe.router_jitter`: input should be less than 1 (got 1.5)"),
    ({"train": {"eval_strategy": "steps"}}, [], "`train.eval_strategy` is 'steps' but `data.eval` is not set"),
    ({"model": "mixtral"}, [], "`model` must be a section"),
    ({}, ["learning_rate"], "override 'learning_rate' must look like key.path=value"),
    ({}, ["model.name_or_path.x=1"], "override `model.name_or_path.x`: `model.name_or_path` is 'org/some-moe', not a section"),
    ({}, ["data.formt=text"], "unknown key `data.formt` (did you mean `format`?)"),
]


@pytest.mark.parametrize("change, overrides, expected", MISTAKES, ids=[m[2][:40] for m in MISTAKES])
def test_each_mistake_is_named(base, change, overrides, expected):
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value} if key != "data" or value else value
        else:
            base[key] = value
    message = problems(base, overrides)
    assert expected in message
    assert message.count("\n  - ") == 1, message  # exactly this one problem


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {name_or_path: x/y, dtype: fp8}\nlora: {r: -1}\ndata: {train: missing.jsonl}\n"
        "output: {dir: o, push_to_hub: true}\ntrain: {lr: 1}\n"
    )
    message = problems(path, ["moe.z_loss_coef=-1"])
    assert message.startswith(f"{path} has 6 problems:")
    for key in ("model.dtype", "lora.r", "data.train", "output.hub_repo_id", "train.lr", "moe.z_loss_coef"):
        assert f"`{key}`" in message


def test_file_level_errors(tmp_path):
    assert "recipe file not found" in problems(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in problems(bad)
    bad.write_text("- just\n- a list\n")
    assert "a recipe is a mapping of sections" in problems(bad)


def test_hub_ids_are_not_checked_offline(base):
    base["data"]["eval"] = "HuggingFaceH4/ultrachat_200k:test_sft"
    base["model"]["name_or_path"] = "mistralai/Mixtral-8x7B-v0.1"
    assert load_recipe(base).data.eval == "HuggingFaceH4/ultrachat_200k:test_sft"


def test_sft_fields_read_from_source_match_trl():
    from dataclasses import fields

    from trl import SFTConfig

    assert sft_config_fields() == {f.name for f in fields(SFTConfig) if not f.name.startswith("_")}


def test_validation_is_fast_and_imports_nothing_heavy(tmp_path):
    path = tmp_path / "r.yaml"
    (tmp_path / "d.jsonl").write_text("{}\n")
    path.write_text(f"model: {{name_or_path: a/b}}\ndata: {{train: {tmp_path / 'd.jsonl'}}}\noutput: {{dir: o}}\n"
                    "train: {learning_rate: 1e-4, num_train_epochs: 1}\n")
    code = (
        "import sys, time; t = time.perf_counter(); from moetune.config import load_recipe; "
        f"load_recipe({str(path)!r}); print(time.perf_counter() - t); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'datasets')))"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert float(out[0]) < 1.0 and time.perf_counter() - start < 5
    assert out[1] == "[]"


def test_freeze_names_expand_like_the_trainer_presets():
    from moetune.freezing import PRESETS
    from moetune.rules import expand_freeze_names

    for name, groups in PRESETS.items():
        assert expand_freeze_names([name]) == set(groups), name
