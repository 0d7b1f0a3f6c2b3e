"""CPU dropout masks: reproducible from a seed, the right drop rate with independent neighbours, a gradient of exactly
mask x scale, and only a boolean mask saved for backward."""

import pytest
import torch
from grad_checks import randomize_lora

from moetune.dropout_masks import dropout, keep_mask, keep_scale


def test_the_same_seed_draws_the_same_mask_and_another_seed_another():
    first = keep_mask((3, 7), 0.5, seed=11)  # 21 elements: not a whole number of 64-bit draws
    assert first.shape == (3, 7) and first.dtype == torch.bool
    assert torch.equal(keep_mask((3, 7), 0.5, seed=11), first)
    masks = {tuple(keep_mask((3, 7), 0.5, seed=s).flatten().tolist()) for s in range(12, 20)}
    assert len(masks) == 8


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_neighbouring_elements_are_independent(p):
    keep = keep_mask((1_000_000,), p, seed=3).float()
    assert float(keep.mean()) == pytest.approx(1 - p, abs=2e-3)
    # Four 16-bit draws come from each 64-bit output: neighbours must not be correlated.
    both = float((keep[:-1] * keep[1:]).mean())
    assert both == pytest.approx((1 - p) ** 2, abs=3e-3)
    fourth = float((keep[:-4] * keep[4:]).mean())
    assert fourth == pytest.approx((1 - p) ** 2, abs=3e-3)


def test_scale_is_exact_for_the_rounded_probability():
    assert keep_scale(0.1) == 65536 / (65536 - 6554)  # 0.1 * 65536 = 6553.6 -> 6554
    assert keep_scale(0.0) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_mask_times_the_scale_and_only_the_boolean_mask_is_saved(dtype):
    x = torch.randn(64, 256, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(0)
        out = dropout(x, 0.25)
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), 0.25), out.detach())  # the seed comes from torch's global RNG
    assert [t.dtype for t in saved] == [torch.bool]
    kept = saved[0]
    assert torch.equal(out.detach() != 0, kept & (x.detach() != 0))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = grad * kept * keep_scale(0.25)
    assert torch.equal(x.grad, expected)
    assert torch.equal(out.detach(), x.detach() * kept * keep_scale(0.25))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_expert_dropout_is_replayed_identically_by_gradient_checkpointing(tiny_model_dir, quantized):
    """The mask's seed comes from torch's RNG, which checkpointing restores before it reruns a layer: the same
    gradients with and without checkpointing (a fresh mask in the replay would change them)."""
    from moetune.adapters import add_adapters
    from moetune.config import LoraSection, ModelSection, MoESection, QuantizationSection
    from moetune.loading import load_model
    from moetune.router_controls import apply_router_controls

    model = load_model(ModelSection(name_or_path=str(tiny_model_dir("mixtral")), dtype="float32"),
                       QuantizationSection() if quantized else None, with_tokenizer=False)[0]
    model = add_adapters(model, LoraSection(r=4, targets=["attention"]))
    randomize_lora(model)  # PEFT starts B at 0, which leaves every A without a gradient
    apply_router_controls(model, MoESection(expert_dropout=0.3))
    model.train()
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(seed=1):
        torch.manual_seed(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    plain = grads()
    assert any(not torch.equal(plain[n], g) for n, g in grads(seed=2).items())  # the masks do reach the gradients
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert all(plain[n].abs().sum() > 0 and torch.equal(plain[n], checkpointed[n]) for n in plain)
