"""load_model: dtypes, experts kernel choice, fp32 router, clear errors, and the bitsandbytes CPU repack fix."""

import json

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from moetune._compat import bnb_cpu_repack_fix_needed, keep_bnb_weights_trainable
from moetune.architectures import find_moe_layers
from moetune.config import ModelSection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.loading import load_model


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_and_no_training_controls(tiny_model_dir, dtype):
    """Loading installs no training controls: the model runs as loaded; the fp32 router comes with the controls."""
    from moetune.config import MoESection
    from moetune.router_controls import apply_router_controls

    model, tokenizer = load_model(ModelSection(name_or_path=str(tiny_model_dir("qwen2_moe")), dtype=dtype))
    assert model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    for layer in find_moe_layers(model):
        assert layer.experts.gate_up_proj.dtype == getattr(torch, dtype)
        assert layer.router.weight.dtype == getattr(torch, dtype) and "forward" not in vars(layer.router)
    ids = tokenizer("The router sends tokens to experts.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    apply_router_controls(model, MoESection(router_fp32=True))
    assert all(layer.router.weight.dtype == torch.float32 for layer in find_moe_layers(model))
    assert torch.isfinite(model(ids).logits).all()


def test_router_fp32_off_keeps_model_dtype(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("mixtral")), router_fp32=False)
    assert all(layer.router.weight.dtype == torch.bfloat16 for layer in find_moe_layers(model))
    q4, _ = load_model(str(tiny_model_dir("mixtral")), QuantizationSection(), router_fp32=False)
    assert all(layer.router.weight.dtype == torch.bfloat16 for layer in find_moe_layers(q4))


def test_experts_implementation_default_and_explicit(tiny_model_dir):
    assert load_model(str(tiny_model_dir("mixtral")))[0].config._experts_implementation == "grouped_mm"
    assert load_model(str(tiny_model_dir("dbrx")))[0].config._experts_implementation == "eager"
    section = ModelSection(name_or_path=str(tiny_model_dir("mixtral")), experts_implementation="eager")
    assert load_model(section, QuantizationSection())[0].config._experts_implementation == "eager"
    # grouped_mm on CPU needs 16-byte-aligned strides: an odd width falls back to eager by default.
    odd = ModelSection(name_or_path=str(tiny_model_dir("mixtral", intermediate_size=36)), dtype="bfloat16")
    assert load_model(odd)[0].config._experts_implementation == "eager"


def test_unsupported_kernel_is_a_clear_error(tiny_model_dir):
    section = ModelSection(name_or_path=str(tiny_model_dir("dbrx")), experts_implementation="grouped_mm")
    with pytest.raises(MoetuneError, match="experts_implementation='grouped_mm'.*dbrx"):
        load_model(section)


def test_missing_path_and_not_a_model(tmp_path):
    with pytest.raises(MoetuneError, match="model.name_or_path: no such model directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoetuneError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(MoetuneError, match="bad"):
        load_model(str(tmp_path / "bad"))


def _wide(tiny_model_dir):
    # hidden 128 = two 64-blocks per row: with one block per row the repack's absmax transpose is a no-op.
    return tiny_model_dir("mixtral", hidden_size=128, intermediate_size=128)


def _dequantized_linear4bit(model) -> dict[str, torch.Tensor]:
    return {name: bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
            for name, m in model.named_modules() if isinstance(m, Linear4bit)}


needs_repack_bug = pytest.mark.skipif(not bnb_cpu_repack_fix_needed() or not bnbF.has_avx512bf16(),
                                      reason="needs bitsandbytes < 0.51 on an AVX512-BF16 CPU")


def _stock_4bit(tiny_model_dir):
    """transformers' own 4-bit load (attention as Linear4bit), without moetune's fix."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(_wide(tiny_model_dir), quantization_config=config,
                                                dtype=torch.bfloat16, device_map="cpu")


def _eval_then_state_dict(model, ids):
    model.eval()
    with torch.no_grad():
        model(ids)
    model.state_dict()


@needs_repack_bug
def test_bnb_cpu_repack_bug_exists_unpatched(tiny_model_dir):
    """Canary: fails once bitsandbytes no longer corrupts Linear4bit weights (then drop keep_bnb_weights_trainable)."""
    model = _stock_4bit(tiny_model_dir)
    before = _dequantized_linear4bit(model)
    _eval_then_state_dict(model, torch.randint(6, 400, (1, 8)))
    after = _dequantized_linear4bit(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_eval_forward_and_state_dict_leave_4bit_weights_intact(tiny_model_dir, double_quant):
    model, _ = load_model(str(_wide(tiny_model_dir)), QuantizationSection(double_quant=double_quant))
    ids = torch.randint(6, 400, (2, 8))
    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits
    before = _dequantized_linear4bit(model)
    _eval_then_state_dict(model, ids)
    after = _dequantized_linear4bit(model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, train_logits, atol=0, rtol=0)
    assert keep_bnb_weights_trainable(model) == 0  # idempotent: load_model already applied it


@needs_repack_bug
def test_keep_bnb_weights_trainable_undoes_an_earlier_repack(tiny_model_dir):
    model = _stock_4bit(tiny_model_dir)
    before = _dequantized_linear4bit(model)
    model.eval()
    with torch.no_grad():
        model(torch.randint(6, 400, (1, 8)))  # repacks every Linear4bit into the CPU inference layout
    assert keep_bnb_weights_trainable(model) > 0
    after = _dequantized_linear4bit(model)
    for name in before:
        # absmax went through bf16 inside bitsandbytes' repack, so the restore is exact only up to that rounding.
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=1e-2)
    _eval_then_state_dict(model, torch.randint(6, 400, (1, 8)))
    for name, value in _dequantized_linear4bit(model).items():
        assert torch.equal(value, after[name]), name
