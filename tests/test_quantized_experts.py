"""4-bit experts dequantize only the routed experts, again in backward, and compute what the dequantize-all path does."""

import pytest
import torch
from bitsandbytes.nn.parametrize import Bnb4bitParametrization
from grad_checks import forward_backward, randomize_lora

from moetune import quantized_experts
from moetune.adapters import add_adapters
from moetune.architectures import find_moe_layers
from moetune.config import LoraSection, ModelSection, QuantizationSection
from moetune.loading import load_model
from moetune.quantized_experts import dequantize_experts, install_quantized_forward, remove_quantized_forward


def _load(path, double_quant=True):
    return load_model(ModelSection(name_or_path=str(path), dtype="float32"), QuantizationSection(double_quant=double_quant),
                      with_tokenizer=False)[0]


def _close(a, b):
    # Both paths multiply the same dequantized values; only grouped_mm's blocking may differ (a wrong expert slice
    # or a missed expert would be off by the whole expert output, ~1e-1 of the scale here).
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_dequantizing_some_experts_gives_their_slices_exactly(tiny_model_dir, arch, double_quant):
    model = _load(tiny_model_dir(arch), double_quant)
    experts = find_moe_layers(model)[0].experts
    for name in ("gate_up_proj", "down_proj"):
        full = getattr(experts, name)  # the parametrization: bitsandbytes dequantizes the whole stack
        assert torch.equal(dequantize_experts(experts, name, None, torch.float32), full)
        some = torch.tensor([3, 0])
        assert torch.equal(dequantize_experts(experts, name, some, torch.float32), full[some])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decoding_into_the_workspace_equals_bitsandbytes_op_bit_for_bit(quant_type, dtype):
    # The workspace decode calls bitsandbytes' C kernel directly (moetune/cpu_decode.py); on the tested versions it
    # must give the op's values exactly, and on any other version it must be the op.
    from bitsandbytes import functional as F

    from moetune import cpu_decode

    weight = torch.randn(6, 96, 64, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    rows, length = 6 * 96 * 64 // 1024, 1024
    op = torch.ops.bitsandbytes.dequantize_4bit(packed, state.absmax, 64, quant_type, [rows, length], dtype)
    ours = cpu_decode.decode_rows(packed, state.absmax, 64, quant_type, rows, length, dtype, reuse=True)
    assert cpu_decode._native_library() is not None  # the direct path really ran here (bitsandbytes 0.50)
    assert ours.dtype == dtype and torch.equal(ours, op)
    again = cpu_decode.decode_rows(packed, state.absmax, 64, quant_type, rows // 2, length, dtype, reuse=True)
    assert again.data_ptr() == ours.data_ptr()  # the same buffer: no fresh allocation to page-fault
    fresh = cpu_decode.decode_rows(packed, state.absmax, 64, quant_type, rows, length, dtype, reuse=False)
    assert fresh.data_ptr() != ours.data_ptr() and torch.equal(fresh, op)


def test_an_untested_bitsandbytes_version_decodes_through_the_op(monkeypatch):
    from bitsandbytes import functional as F

    from moetune import cpu_decode

    weight = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(2))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    monkeypatch.setattr(cpu_decode, "_library", None)
    monkeypatch.setattr(cpu_decode, "TESTED_VERSIONS", ("9.9.",))
    cpu_decode.release_workspaces()
    out = cpu_decode.decode_rows(packed, state.absmax, 64, "nf4", 16, 1024, torch.float32, reuse=True)
    assert not cpu_decode._workspaces  # no workspace, no direct kernel
    assert torch.equal(out, torch.ops.bitsandbytes.dequantize_4bit(packed, state.absmax, 64, "nf4", [16, 1024],
                                                                     torch.float32))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_attention_qlora_equals_the_dequantize_everything_path(tiny_model_dir, arch):
    model = add_adapters(_load(tiny_model_dir(arch)), LoraSection(r=4, targets=["attention"]))
    randomize_lora(model)
    model.train()
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    assert quantized_experts._ATTR in find_moe_layers(model)[0].experts.__dict__  # installed by load_model
    logits, d_embeds, grads = forward_backward(model, ids)
    assert remove_quantized_forward(model) == 2  # both layers: back to transformers' grouped_mm on the dequantized stack
    ref_logits, ref_d_embeds, ref_grads = forward_backward(model, ids)
    assert _close(logits, ref_logits), (logits - ref_logits).abs().max()
    assert _close(d_embeds, ref_d_embeds)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 4 * 2  # 2 layers x q/k/v/o x A/B
    for name, grad in grads.items():
        assert ref_grads[name].abs().sum() > 0 and _close(grad, ref_grads[name]), name
    assert install_quantized_forward(model) == 2


def test_experts_without_tokens_are_never_dequantized(tiny_model_dir, monkeypatch):
    model = add_adapters(_load(tiny_model_dir("qwen3_moe", num_experts=8)), LoraSection(r=4, targets=["attention"]))
    model.train()
    routed, decoded, whole = {}, [], []
    for layer in find_moe_layers(model):  # which experts each layer really routes to, from its inputs
        layer.experts.register_forward_pre_hook(
            lambda module, args, name=layer.experts_name: routed.setdefault(name, set()).update(args[1].flatten().tolist()))
    real = quantized_experts.dequantize_experts

    def counting(experts, name, ids, dtype, **options):
        decoded.append((experts, set(range(experts.num_experts)) if ids is None else set(ids.tolist())))
        return real(experts, name, ids, dtype, **options)

    real_parametrization = Bnb4bitParametrization.forward
    monkeypatch.setattr(quantized_experts, "dequantize_experts", counting)
    monkeypatch.setattr(Bnb4bitParametrization, "forward",
                        lambda self, x: whole.append(x.shape) or real_parametrization(self, x))
    ids = torch.randint(6, 400, (1, 2), generator=torch.Generator().manual_seed(0))  # 2 tokens x top-2 of 8 experts
    model(ids, labels=ids).loss.backward()
    assert not whole  # the whole-stack dequantization (the parametrization) never ran
    by_module = {id(layer.experts): layer.experts_name for layer in find_moe_layers(model)}
    assert len(decoded) == 2 * 2 * 2  # layers x projections x (forward, backward)
    for experts, decoded_ids in decoded:
        assert decoded_ids == routed[by_module[id(experts)]] and len(decoded_ids) < 8


def test_no_dequantized_weight_is_kept_for_backward(tiny_model_dir):
    model = add_adapters(_load(tiny_model_dir("mixtral")), LoraSection(r=4, targets=["attention"]))
    model.train()
    experts = find_moe_layers(model)[0].experts
    stacks = {tuple(experts.parametrizations[n][0].quant_state.shape) for n in ("gate_up_proj", "down_proj")}
    stacks |= {(e, i, o) for e, o, i in stacks}  # grouped_mm saves the transposed view
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))

    def saved_expert_stacks():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(shape in stacks for shape in shapes)

    assert saved_expert_stacks() == 0  # backward dequantizes again
    remove_quantized_forward(model)
    assert saved_expert_stacks() == 2 * 2  # the dequantize-everything path keeps both stacks of both layers


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
def test_narrow_experts_dequantize_as_accurately_as_any_4bit_weight(tiny_model_dir, double_quant):
    # down_proj [E, H, 32]: bitsandbytes 0.50.2's CPU `dequantize_4bit` given that 3-D shape decodes blocks per row of
    # 32 and pairs values with the wrong absmax; moetune decodes flat rows and gets nf4's usual error, both in the
    # routed path and when the whole stack is read (`experts.down_proj`: PEFT's fold, merging).
    from bitsandbytes import functional as F

    path = tiny_model_dir("mixtral")
    exact = load_model(ModelSection(name_or_path=str(path), dtype="float32"), with_tokenizer=False)[0]
    experts = find_moe_layers(_load(path, double_quant))[0].experts
    reference = find_moe_layers(exact)[0].experts.down_proj.detach()
    assert reference.shape[-1] == 32

    def error(w):
        return float((w - reference).norm() / reference.norm())

    ours = dequantize_experts(experts, "down_proj", None, torch.float32)
    assert error(ours) < 0.12  # nf4 with 64-element blocks: ~0.09 (0.092 measured for a Linear4bit weight)
    assert torch.equal(dequantize_experts(experts, "down_proj", torch.tensor([2, 1]), torch.float32), ours[[2, 1]])
    assert torch.equal(experts.down_proj, ours)
    parametrization = experts.parametrizations["down_proj"]
    bnb_own = F.dequantize_4bit(parametrization.original, parametrization[0].quant_state)
    assert error(bnb_own) > 0.15  # the bug this works around; when it fails, bitsandbytes is fixed


def test_large_routed_stacks_are_decoded_a_run_of_experts_at_a_time(tiny_model_dir, monkeypatch):
    model = add_adapters(_load(tiny_model_dir("qwen3_moe", num_experts=8)), LoraSection(r=4, targets=["attention"]))
    randomize_lora(model)
    model.train()
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    whole_logits, whole_d_embeds, whole_grads = forward_backward(model, ids)
    experts = find_moe_layers(model)[0].experts
    expert_bytes = experts.parametrizations["gate_up_proj"][0].quant_state.shape[1:].numel() * 4
    monkeypatch.setattr(quantized_experts, "DEQUANT_CHUNK_BYTES", 3 * expert_bytes)  # gate_up: runs of 3 experts
    sizes = []
    real = quantized_experts.dequantize_experts
    monkeypatch.setattr(quantized_experts, "dequantize_experts",
                        lambda experts, name, ids, dtype, **options: sizes.append(
                            real(experts, name, ids, dtype, **options).numel() * 4) or real(experts, name, ids, dtype, **options))
    logits, d_embeds, grads = forward_backward(model, ids)
    assert max(sizes) <= 3 * expert_bytes and len(sizes) > 2 * 2 * 2  # more than one run per projection
    assert _close(logits, whole_logits) and _close(d_embeds, whole_d_embeds)
    assert all(_close(grads[n], whole_grads[n]) for n in grads)
