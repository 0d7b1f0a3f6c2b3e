"""Selective freezing: each preset trains exactly its groups (frozen weights bit-identical after real optimizer
steps, trained ones changed), with and without LoRA; bad names and quantized weights are clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moetune.architectures import GROUPS, classify_parameters
from moetune.config import FreezeSection
from moetune.errors import MoetuneError
from moetune.freezing import PRESETS, freeze
from moetune.tiny import tiny_config


def _model(arch: str = "qwen3_moe"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


def _train_steps(model, steps: int = 3) -> None:
    """A few AdamW steps over ALL parameters: a parameter that stays identical did so because it was frozen."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(6, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _changed(model, before) -> dict[str, bool]:
    return {name: not torch.equal(param.detach(), before[name]) for name, param in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("preset", ["non_experts", "experts", "router", "all"])
def test_preset_trains_exactly_its_groups(arch, preset):
    model = _model(arch)
    report = freeze(model, FreezeSection(train=[preset]), lora_enabled=False)
    groups = classify_parameters(model)
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(model, before)
    expected = set(PRESETS[preset])
    for name, group in groups.items():
        assert changed[name] == (group in expected), f"{preset}: {name} ({group}) changed={changed[name]}"
    assert set(report.trained_in_full) == {g for g in groups.values() if g in expected}
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_group_names_and_regexes():
    model = _model()
    freeze(model, FreezeSection(train=["attention", "norm"], include=[r"^model\.layers\.1\.mlp\.gate\."],
                                exclude=[r"\.k_proj\."]), lora_enabled=False)
    groups = classify_parameters(model)
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(model, before)
    for name, group in groups.items():
        expected = (group in ("attention", "norm") and ".k_proj." not in name) or name.startswith("model.layers.1.mlp.gate.")
        assert changed[name] == expected, name


def test_default_trains_everything_without_lora_and_nothing_with():
    model = _model()
    freeze(model, FreezeSection(), lora_enabled=False)
    assert all(p.requires_grad for p in model.parameters())
    freeze(model, FreezeSection(), lora_enabled=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_with_lora_adapters_train_and_the_router_in_full():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    report = freeze(model, FreezeSection(train=["router"]), lora_enabled=True)
    groups = classify_parameters(model)
    assert report.trainable_by_group["adapter"] > 0 and report.trained_in_full == ["router"]
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(model, before)
    for name, group in groups.items():
        if group == "adapter":
            continue  # lora_A gets no gradient on step 1 (lora_B starts at 0); lora_B must move
        assert changed[name] == (group == "router"), name
    assert any(changed[n] for n, g in groups.items() if g == "adapter" and "lora_B" in n)
    assert "router" in report.format_table() and "adapter" in report.format_table()


def test_unknown_name_lists_allowed_values():
    with pytest.raises(MoetuneError, match="unknown name.*'expert'.*non_experts.*attention"):
        freeze(_model(), FreezeSection(train=["expert"]), lora_enabled=False)


def test_invalid_regex_names_the_key():
    with pytest.raises(MoetuneError, match=r"freeze.exclude.*'\('"):
        freeze(_model(), FreezeSection(exclude=["("]), lora_enabled=False)


def test_quantized_experts_cannot_train_in_full():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from moetune.architectures import find_moe_layers

    model = _model("mixtral")
    for layer in find_moe_layers(model):
        replace_parameter_4bit(layer.experts, "gate_up_proj")
        replace_parameter_4bit(layer.experts, "down_proj")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(MoetuneError, match="quantized.*experts: model.layers.0.mlp.experts.gate_up_proj.*LoRA"):
        freeze(model, FreezeSection(train=["all"]), lora_enabled=False)
    assert flags == [p.requires_grad for p in model.parameters()]  # nothing changed
    report = freeze(model, FreezeSection(train=["non_experts"]), lora_enabled=False)
    assert report.trainable_by_group.get("experts", 0) == 0 and report.total_by_group["experts"] > 0


def test_table_counts_every_group():
    model = _model("deepseek_v3")
    report = freeze(model, FreezeSection(train=["experts"]), lora_enabled=False)
    table = report.format_table()
    assert report.total == sum(p.numel() for p in model.parameters())
    for group in set(classify_parameters(model).values()):
        assert group in GROUPS and group in table


def test_groups_trained_in_full_beside_lora_are_saved_with_the_adapter(tiny_model_dir, tmp_path):
    # PEFT saves only adapter weights unless the fully trained modules are its modules_to_save; without them a
    # LoRA + router fine-tune would silently lose the router on save.
    from peft import PeftModel

    from moetune.adapters import add_adapters
    from moetune.config import LoraSection
    from moetune.freezing import modules_trained_in_full

    path = tiny_model_dir("mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    section = FreezeSection(train=["router"])
    to_save = modules_trained_in_full(model, section)
    assert to_save == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    peft_model = add_adapters(model, LoraSection(r=4, targets=["attention"]), modules_to_save=to_save)
    freeze(peft_model, section, lora_enabled=True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)

    ids = torch.randint(6, 512, (2, 12))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    router_before = base.model.layers[0].mlp.gate.weight.clone()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)
    saved_router = reloaded.base_model.model.model.layers[0].mlp.gate.modules_to_save["default"].weight
    assert not torch.equal(saved_router, router_before)


def test_a_module_cannot_be_both_adapted_and_trained_in_full(tiny_model_dir):
    from moetune.adapters import add_adapters
    from moetune.config import LoraSection
    from moetune.freezing import modules_trained_in_full

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"), dtype=torch.float32)
    to_save = modules_trained_in_full(model, FreezeSection(train=["attention"]))
    with pytest.raises(MoetuneError, match="both LoRA targets"):
        add_adapters(model, LoraSection(targets=["attention"]), modules_to_save=to_save)


def test_table_is_one_line_when_everything_trains():
    model = _model("mixtral")
    report = freeze(model, FreezeSection(), lora_enabled=False)
    table = report.format_table()
    assert "\n" not in table and f"{report.total:,}" in table and "experts" in table
    partial = freeze(model, FreezeSection(train=["router"]), lora_enabled=False).format_table()
    assert partial.count("\n") >= 3 and "router" in partial
