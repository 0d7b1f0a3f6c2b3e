"""4-bit loading quantizes the fused experts of every family; resident bytes are measured, quant state included."""

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.parametrize import Bnb4bitParametrization

from moetune.architectures import classify_parameters, find_moe_layers
from moetune.config import MoESection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.loading import load_model
from moetune.quantization import (
    check_experts_quantized,
    measure_quantized,
    resident_bytes_by_group,
    usage_by_group,
)
from moetune.router_controls import apply_router_controls
from moetune.tiny import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_loads_4bit_with_experts_quantized(tiny_model_dir, arch):
    model, tokenizer = load_model(str(tiny_model_dir(arch)), QuantizationSection(), router_fp32=True)
    apply_router_controls(model, MoESection())  # what MoETrainer installs: the fp32 router runs in fp32
    assert model.is_loaded_in_4bit
    layers = find_moe_layers(model)
    for layer in layers:
        weights = [(n, p) for n, p in layer.experts.named_parameters()
                   if not f"{layer.experts_name}.{n}".startswith(layer.router_name + ".") and "bias" not in n]
        assert weights, f"no expert weights in {layer.experts_name}"
        for name, param in weights:
            owner_path, sep, rest = name.rpartition("parametrizations.")
            assert sep, f"{layer.experts_name}.{name} is not quantized"
            owner = layer.experts.get_submodule(owner_path.rstrip(".")) if owner_path else layer.experts
            attr = rest.split(".")[0]
            assert isinstance(owner.parametrizations[attr][0], Bnb4bitParametrization), name
            assert param.dtype == torch.uint8, name
        # The router keeps full precision, in fp32 (router_fp32=True, as training loads it).
        for name, param in layer.router.named_parameters():
            assert param.dtype == torch.float32, name
        assert not any(isinstance(m, Linear4bit) for m in layer.router.modules())
    groups = classify_parameters(model)
    quantized_attention = [n for n, g in groups.items() if g == "attention" and n.endswith(".weight")
                           and isinstance(model.get_submodule(n.rpartition(".")[0]), Linear4bit)]
    assert quantized_attention, "no attention Linear was quantized"
    for name, group in groups.items():
        if group in ("embedding", "lm_head"):
            assert model.get_parameter(name).dtype == torch.bfloat16, name
    # It runs forward and backward in bf16.
    ids = torch.randint(0, len(tokenizer), (2, 8))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_resident_bytes_count_quant_state_and_shrink_experts(tiny_model_dir):
    path = str(tiny_model_dir("mixtral"))
    full, _ = load_model(path)
    q4, _ = load_model(path, QuantizationSection(), router_fp32=True)
    full_groups, q_groups = usage_by_group(full), usage_by_group(q4)
    assert resident_bytes_by_group(q4) == {g: e["resident_bytes"] for g, e in q_groups.items()}
    # Logical parameter counts do not change with quantization.
    assert {g: e["params"] for g, e in full_groups.items()} == {g: e["params"] for g, e in q_groups.items()}
    experts_params = q_groups["experts"]["params"]
    # 4 bits per weight plus absmax/quant_map: above half a byte per parameter, far below bf16's two.
    assert experts_params * 0.5 < q_groups["experts"]["resident_bytes"] < experts_params * 0.75
    assert full_groups["experts"]["resident_bytes"] == experts_params * 2
    # Quant state is counted: more than the packed uint8 weights alone.
    packed = sum(p.numel() for n, p in q4.named_parameters() if classify_parameters(q4)[n] == "experts")
    assert q_groups["experts"]["resident_bytes"] > packed
    assert q_groups["router"]["resident_bytes"] == q_groups["router"]["params"] * 4  # fp32 router


def test_double_quant_is_smaller_than_single(tiny_model_dir):
    # Big enough that the saved 3 bytes per 64-weight block outweigh the second-level code book (1 KiB a tensor).
    path = str(tiny_model_dir("mixtral", hidden_size=128, intermediate_size=128))
    single = measure_quantized(path, QuantizationSection(double_quant=False))
    double = measure_quantized(path, QuantizationSection(double_quant=True))
    assert double["resident_bytes"] < single["resident_bytes"]
    assert double["groups"]["experts"]["resident_bytes"] < single["groups"]["experts"]["resident_bytes"]
    assert double["bytes_per_param"] == pytest.approx(
        double["resident_bytes"] / sum(g["params"] for g in double["groups"].values()))


def test_fp4_differs_from_nf4(tiny_model_dir):
    path = str(tiny_model_dir("mixtral"))
    nf4, _ = load_model(path, QuantizationSection(quant_type="nf4"))
    fp4, _ = load_model(path, QuantizationSection(quant_type="fp4"))
    a = nf4.model.layers[0].mlp.experts.gate_up_proj
    b = fp4.model.layers[0].mlp.experts.gate_up_proj
    assert a.shape == b.shape and not torch.equal(a, b)


def test_check_refuses_unquantized_experts(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("mixtral")))
    with pytest.raises(MoetuneError, match="unquantized.*experts.gate_up_proj"):
        check_experts_quantized(model)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_prepare_for_kbit_training_keeps_4bit_experts_usable(tiny_model_dir, impl):
    from moetune.adapters import add_adapters
    from moetune.config import LoraSection, ModelSection
    from moetune.quantization import prepare_for_kbit_training

    section = ModelSection(name_or_path=str(tiny_model_dir("mixtral")), experts_implementation=impl)
    model = prepare_for_kbit_training(load_model(section, QuantizationSection())[0], gradient_checkpointing=True)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.parametrizations.gate_up_proj.original.dtype == torch.uint8
    model = add_adapters(model, LoraSection(r=4, targets=["attention", "experts"]))
    model.train()
    ids = torch.randint(6, 400, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_chunked_quantization_is_bit_identical_to_bitsandbytes(quant_type, double_quant, monkeypatch):
    import bitsandbytes.functional as F

    import moetune.quantization
    from moetune.quantization import quantize_4bit_chunked

    # 24576 elements in slices of 5120: four full slices and a shorter last one.
    monkeypatch.setattr(moetune.quantization, "QUANTIZE_SLICE", 5120)

    weight = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = quantize_4bit_chunked(weight, quant_type, double_quant)
    ref_packed, ref_state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                            quant_type=quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(ref_packed, ref_state))
    ours, theirs = state.as_dict(packed=True), ref_state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
