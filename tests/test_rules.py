"""moetune.rules: one owner per naming rule, shared by recipe validation (torch-free) and the runtime.

Each test holds both sides to the same answer: what `load_recipe` accepts is what `freeze` / `resolve_targets` /
`read_config` / the data reader do, name by name.
"""

import subprocess
import sys

import pytest

from moetune.adapters import resolve_targets
from moetune.architectures import classify_parameters, describe_moe, find_moe_layers
from moetune.config import FreezeSection, ModelSection, load_recipe
from moetune.data import SplitReport
from moetune.data_sources import _read_rows
from moetune.errors import MoetuneError, RecipeError
from moetune.freezing import freeze
from moetune.loading import load_model, read_config
from moetune.rules import (
    FREEZE_NAMES,
    GROUPS,
    LORA_GROUPS,
    PRESETS,
    expand_freeze_names,
    is_expert_weight,
    is_local_data_source,
    is_local_model_path,
)


def test_rules_and_config_never_import_torch():
    code = (
        "import sys; import moetune.rules as r, moetune.config; "
        "r.expand_freeze_names(r.FREEZE_NAMES); r.is_local_model_path('./m'); r.is_local_data_source('d.jsonl'); "
        "r.is_hub_id('org/name'); r.is_expert_weight('m.experts.down_proj', 'm.gate'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'peft')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _problems(recipe: dict) -> str:
    try:
        load_recipe(recipe)
    except RecipeError as err:
        return str(err)
    return ""


@pytest.fixture(scope="module")
def recipe_base(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    data.write_text('{"text": "hello"}\n')

    def make(**sections) -> dict:
        return {"model": {"name_or_path": str(tiny_model_dir("deepseek_v3"))}, "data": {"train": str(data)},
                "output": {"dir": "out"}, **sections}
    return make


@pytest.fixture(scope="module")
def deepseek(tiny_model_dir):
    # deepseek_v3's tiny build has every base group: a dense first layer, shared and routed experts, MLA attention.
    model, _ = load_model(ModelSection(name_or_path=str(tiny_model_dir("deepseek_v3")), dtype="float32"))
    return model


def test_presets_and_group_names_are_the_same_list_on_both_sides():
    assert set(FREEZE_NAMES) == set(PRESETS) | set(GROUPS)
    assert set(LORA_GROUPS) <= set(GROUPS)
    assert expand_freeze_names(["all"]) == set(GROUPS)
    assert expand_freeze_names(["non_experts", "experts"]) == set(GROUPS)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_each_freeze_name_validates_and_trains_exactly_what_it_expands_to(arch, tiny_model_dir, recipe_base):
    model, _ = load_model(ModelSection(name_or_path=str(tiny_model_dir(arch)), dtype="float32"))
    groups = classify_parameters(model)
    present = set(groups.values())
    for name in FREEZE_NAMES:
        assert _problems(recipe_base(freeze={"train": [name]})) == "", name
        report = freeze(model, FreezeSection(train=[name]), lora_enabled=False)
        trained = {groups[n] for n, p in model.named_parameters() if p.requires_grad}
        assert trained == expand_freeze_names([name]) & present == set(report.trained_in_full), (arch, name)
    assert "linear_attention" in present if arch == "qwen3_next" else {"dense_mlp", "shared_experts"} <= present


def test_an_unknown_freeze_name_is_rejected_by_both(deepseek, recipe_base):
    assert "unknown group or preset 'expert'" in _problems(recipe_base(freeze={"train": ["expert"]}))
    with pytest.raises(MoetuneError, match="unknown name"):
        freeze(deepseek, FreezeSection(train=["expert"]), lora_enabled=False)


def test_each_lora_group_validates_and_resolves(deepseek, recipe_base):
    for group in LORA_GROUPS:
        assert _problems(recipe_base(lora={"targets": [group]})) == "", group
        modules, params = resolve_targets(deepseek, [group])
        assert modules or params, group
    assert "is not a group (did you mean `experts`?)" in _problems(recipe_base(lora={"targets": ["expert"]}))
    with pytest.raises(MoetuneError, match="matches nothing"):
        resolve_targets(deepseek, ["expert"])


def test_expert_weights_are_named_the_same_by_the_map_and_the_adapters(tiny_model_dir):
    model, _ = load_model(ModelSection(name_or_path=str(tiny_model_dir("gpt_oss")), dtype="float32"))
    info = describe_moe(model)
    assert any(name.endswith("bias") for name in info.expert_param_names)  # gpt_oss' experts carry biases
    expected = {f"{layer.experts_name}.{name}" for layer in find_moe_layers(model)
                for name in info.expert_param_names if is_expert_weight(name)}
    assert set(resolve_targets(model, ["experts"])[1]) == expected
    assert not is_expert_weight("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.router")
    assert not is_expert_weight("model.layers.0.mlp.experts.lora_A.default.weight")
    assert not is_expert_weight("model.layers.0.mlp.router.layer.weight", "model.layers.0.mlp.router")  # JetMoE


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-moetune-model", "org/name/extra"])
def test_a_missing_local_model_is_rejected_by_validation_and_by_loading(name, recipe_base):
    assert is_local_model_path(name)
    assert f"`model.name_or_path`: local model directory {name!r} not found" in _problems(
        recipe_base(model={"name_or_path": name}))
    with pytest.raises(MoetuneError, match="no such model directory"):
        read_config(name)


def test_a_hub_id_is_left_to_the_hub_by_both(recipe_base):
    assert not is_local_model_path("org/some-moe")
    assert "name_or_path" not in _problems(recipe_base(model={"name_or_path": "org/some-moe"}))
    with pytest.raises(MoetuneError, match="Hub id 'org/some-moe'"):  # offline in tests: the Hub path was taken
        read_config("org/some-moe")


@pytest.mark.parametrize("source", ["./missing", "missing.jsonl", "~/no-such-moetune-data.csv"])
def test_a_missing_local_data_file_is_rejected_by_validation_and_by_the_reader(source, recipe_base):
    assert is_local_data_source(source)
    problems = _problems(recipe_base(data={"train": source}))
    assert f"`data.train`: data file {source!r} not found" in problems or "unsupported file type" in problems
    with pytest.raises(MoetuneError, match="not found"):  # read as a local file, never sent to the Hub
        _read_rows(source, "data.train", SplitReport(split="train", source=source))


def test_hub_dataset_ids_are_not_local():
    for source in ("org/dataset", "org/dataset:test", "dataset"):
        assert not is_local_data_source(source)


def test_the_cached_layout_follows_peft_wrapping(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(ModelSection(name_or_path=str(tiny_model_dir("mixtral")), dtype="float32"))
    before = find_moe_layers(model)
    assert find_moe_layers(model)[0].experts is before[0].experts  # cached, same objects
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=[
        f"{layer.experts_name}.down_proj" for layer in before], modules_to_save=[before[0].router_name]))
    after = find_moe_layers(peft_model)
    assert after[0].experts is not before[0].experts and type(after[0].experts).__name__ == "ParamWrapper"
    assert type(after[0].router).__name__ == "ModulesToSaveWrapper"
    assert after[1].router is before[1].router  # untouched modules stay
    assert describe_moe(peft_model).moe_layers == [layer.index for layer in before]
