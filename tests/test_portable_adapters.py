"""Adapters moetune writes load with plain PEFT, from any working directory, to the logits `load_adapter` gives."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from tiny_runs import make_run
from transformers import AutoModelForCausalLM

from moetune.adapters import load_adapter
from moetune.config import ModelSection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.loading import load_model
from moetune.portable_adapters import adapter_parameter_counts, make_adapter_portable, resolve_base
from moetune.tiny import TINY_ARCHS


FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss", "granitemoe"]
KINDS = {
    "attention_lora": dict(targets=["attention"]),
    "expert_lora": dict(targets=["experts"]),
    "router_lora": dict(targets=["router"]),
    "router_in_full": dict(targets=["attention"], train_in_full=["router"]),
}
IDS = torch.randint(6, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _moetune_reference(model_dir, run, **quantized):
    """What moetune's own loader gives: the base as `load_model` loads it, then `load_adapter`."""
    section = ModelSection(name_or_path=str(model_dir), dtype="float32")
    return _logits(load_adapter(load_model(section, **quantized)[0], run))


def _assert_plain_peft_matches(model_dir, run, monkeypatch, elsewhere, reference, auto=True, exact=True):
    # exact=False for expert LoRA: moetune computes it the split way (expert_lora.py), PEFT folds it into the weight;
    # the same function, rounded differently (~1e-7 here; a wrong or missing expert block would be ~1e-2).
    tolerance = dict(atol=0, rtol=0) if exact else dict(atol=1e-5, rtol=1e-4)
    monkeypatch.chdir(elsewhere)  # the adapter must not depend on the directory training ran in
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(run))
    torch.testing.assert_close(_logits(plain), reference, **tolerance)
    if auto:  # the base found through adapter_config.json alone
        auto_model = AutoPeftModelForCausalLM.from_pretrained(str(run), dtype=torch.float32)
        torch.testing.assert_close(_logits(auto_model), reference, **tolerance)


def _check_family(arch, tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir(arch)
    (tmp_path / "elsewhere").mkdir()
    for kind, options in KINDS.items():
        if (arch, kind) == ("dbrx", "expert_lora"):
            continue  # cannot train at all: DbrxExperts reads `self.mlp.v1` past PEFT's ParamWrapper (AttributeError)
        run = make_run(tmp_path / kind, model_dir, steps=1, **options)  # one step makes every lora_B non-zero
        assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir.resolve())
        reference = _moetune_reference(model_dir, run)
        _assert_plain_peft_matches(model_dir, run, monkeypatch, tmp_path / "elsewhere", reference,
                                   auto=kind == "expert_lora", exact=kind != "expert_lora")
        monkeypatch.undo()


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_adapter_kind_loads_with_plain_peft(arch, tiny_model_dir, tmp_path, monkeypatch):
    _check_family(arch, tiny_model_dir, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a not in FAMILIES])
def test_every_adapter_kind_loads_with_plain_peft_all_families(arch, tiny_model_dir, tmp_path, monkeypatch):
    _check_family(arch, tiny_model_dir, tmp_path, monkeypatch)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_lora_trained_on_4bit_loads_with_plain_peft(arch, tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir(arch)
    (tmp_path / "elsewhere").mkdir()
    run = make_run(tmp_path / "run", model_dir, targets=["experts", "attention"], quantized=True, portable=False)
    with pytest.raises(RuntimeError, match=r"size mismatch for .*experts\.base_layer\.lora_A"):  # PEFT's nesting order
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(run))
    on_4bit_before = _moetune_reference(model_dir, run, quantization=QuantizationSection())
    on_plain_before = _moetune_reference(model_dir, run)

    make_adapter_portable(run)
    weights = (run / "adapter_model.safetensors").read_bytes()
    make_adapter_portable(run)  # idempotent
    assert (run / "adapter_model.safetensors").read_bytes() == weights

    # load_adapter reads the new layout onto either base, to the same logits as the old layout gave.
    torch.testing.assert_close(_moetune_reference(model_dir, run, quantization=QuantizationSection()), on_4bit_before,
                               atol=0, rtol=0)
    torch.testing.assert_close(_moetune_reference(model_dir, run), on_plain_before, atol=0, rtol=0)
    _assert_plain_peft_matches(model_dir, run, monkeypatch, tmp_path / "elsewhere", on_plain_before, exact=False)


def test_relative_base_is_stored_absolute(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("qwen3_moe")
    monkeypatch.chdir(model_dir.parent)
    run = make_run(tmp_path / "run", model_dir.name, targets=["router"], portable=False)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir.name
    make_adapter_portable(run)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir.resolve())


def test_resolve_base_keeps_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert resolve_base("allenai/OLMoE-1B-7B-0924") == "allenai/OLMoE-1B-7B-0924"
    assert resolve_base("local") == str(tmp_path.resolve() / "local")


def test_parameter_counts_by_group(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir("mixtral"), targets=["attention", "experts"], train_in_full=["router"])
    counts = adapter_parameter_counts(run)
    assert set(counts) == {"attention", "experts", "router"}
    assert counts["router"] == {"full": 2 * 4 * 64}  # two MoE layers, [E, H] router weights trained in full
    assert counts["attention"]["lora"] > 0 and counts["experts"]["lora"] > 0


def test_errors(tmp_path, tiny_model_dir):
    with pytest.raises(MoetuneError, match="no adapter_config.json"):
        make_adapter_portable(tmp_path)
    run = make_run(tmp_path / "run", tiny_model_dir("mixtral"), targets=["attention"])
    with pytest.raises(MoetuneError, match="does not fit the base"):
        make_adapter_portable(run, str(tiny_model_dir("mixtral", hidden_size=128)))
