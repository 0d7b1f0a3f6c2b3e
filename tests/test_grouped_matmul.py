"""Grouped matmul over expert-sorted rows: bf16 on CPU multiplies over a few bucketed row counts (so oneDNN reuses its
compiled kernels) and still gives every group exactly its own rows' products, down the real 4-bit chain too."""

import random

import pytest
import torch
from grad_checks import assert_same_step, randomize_lora

from moetune.adapters import add_adapters
from moetune.config import LoraSection, ModelSection, QuantizationSection
from moetune.grouped_matmul import bucket_rows, gmm, gmm_weight_grad
from moetune.loading import load_model
from moetune.quantized_experts import remove_quantized_forward


def test_bucketed_row_counts_cover_the_rows_with_little_waste_and_few_sizes():
    sizes = {bucket_rows(n) for n in range(1, 8193)}
    for n in range(1, 8193):
        m = bucket_rows(n)
        assert m >= n and m % 8 == 0
        assert m - n < 8 if n < 128 else m <= n * 1.0625
    assert len(sizes) <= 16 + 16 * 6  # 8-row steps below 128, then 16 sizes per doubling up to 8192


def _reference(x, w, counts):
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(x[start:start + n].float() @ w[g].float())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("counts", [[37, 0, 5, 90, 1], [0, 0, 64], [3], [200, 13, 0, 0, 7]],
                         ids=["mixed", "leading-empty", "one-group", "short-tail"])
@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_groups_get_exactly_their_own_rows(counts, transposed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 48, generator=gen).bfloat16()
    w = torch.randn(len(counts), 40, 48, generator=gen).bfloat16().transpose(1, 2) if transposed else \
        torch.randn(len(counts), 48, 40, generator=gen).bfloat16()
    offsets = torch.tensor(counts).cumsum(0, dtype=torch.int32)
    out = gmm(x, w, offsets, counts)
    assert out.shape == (sum(counts), 40) and out.dtype == torch.bfloat16
    # bf16 rounding of one product only; a row from a neighbouring group would be off by the whole product
    torch.testing.assert_close(out.float(), _reference(x, w, counts), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("counts", [[37, 0, 5, 90, 1], [0, 0, 64], [3], [200, 13, 0, 0, 7]],
                         ids=["mixed", "leading-empty", "one-group", "short-tail"])
def test_bf16_weight_gradients_sum_exactly_each_groups_own_rows(counts):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 48, generator=gen).bfloat16()
    grad = torch.randn(sum(counts), 8, generator=gen).bfloat16()
    out = gmm_weight_grad(x, grad, torch.tensor(counts).cumsum(0, dtype=torch.int32), counts)
    ref = torch.stack([a.float().t() @ b.float() for a, b in zip(x.split(counts), grad.split(counts))])
    assert out.shape == (len(counts), 48, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    assert all(not out[g].any() for g, n in enumerate(counts) if n == 0)


def test_many_routings_reuse_a_few_matmul_shapes(monkeypatch):
    shapes, inner, mm = set(), set(), torch.mm

    def spy(a, b, **kwargs):
        if b.shape[1] == 16:  # gmm: `[rows, 32] @ [32, 16]`
            shapes.add(a.shape[0])
        else:  # the weight gradient: `[32, rows] @ [rows, 4]`
            inner.add(a.shape[1])
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    rng = random.Random(0)
    w = torch.randn(8, 32, 16).bfloat16()
    exact = set()
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 1024), 7))
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, 1024])]
        exact.update(counts)
        offsets = torch.tensor(counts).cumsum(0, dtype=torch.int32)
        gmm(torch.randn(1024, 32).bfloat16(), w, offsets, counts)
        gmm_weight_grad(torch.randn(1024, 32).bfloat16(), torch.randn(1024, 4).bfloat16(), offsets, counts)
    assert len(exact) > 300  # what per-count kernels would have compiled
    for seen in (shapes, inner):
        assert seen and seen <= {bucket_rows(n) for n in exact}  # every multiply over a bucketed row count
        assert len(seen) <= 80


def _bf16_4bit(tiny_model_dir, arch: str, lora: LoraSection):
    model = load_model(ModelSection(name_or_path=str(tiny_model_dir(arch)), dtype="bfloat16"), QuantizationSection(),
                       with_tokenizer=False)[0]
    model = add_adapters(model, lora)
    randomize_lora(model)
    return model.train()


def _close_within(tol: float):
    """bf16 rounding, relative to each tensor's scale; a row of another expert would be off by a whole product."""
    def close(actual, expected):
        expected = expected.float()
        torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    return close


def test_bf16_4bit_experts_chain_equals_the_dequantize_everything_path(tiny_model_dir):
    model = _bf16_4bit(tiny_model_dir, "mixtral", LoraSection(r=4, targets=["attention"]))
    ids = torch.randint(6, 400, (2, 24), generator=torch.Generator().manual_seed(0))

    def to_dequantize_everything(model):  # transformers' grouped_mm over every dequantized expert
        assert remove_quantized_forward(model) == 2

    # Measured: <= 0.6% of each tensor's scale apart. Which rows pair with which expert is pinned down by the tests
    # above and below; this one holds the bf16 4-bit chain to transformers' own path.
    assert_same_step(model, ids, to_dequantize_everything, _close_within(2e-2))


def _unbucketed(x, w, offsets, counts):
    """Exact row counts, as `gmm` multiplied before bucketing: torch's grouped_mm where it applies, else per group."""
    from moetune.grouped_matmul import _grouped_mm_for

    w = w.to(x.dtype)
    grouped = _grouped_mm_for(x, w)
    if grouped is not None:
        return grouped(x, w, offs=offsets)
    return torch.cat([rows @ w[g] for g, rows in enumerate(x.split(counts)) if rows.shape[0]])


def _unbucketed_weight_grad(x, grad, offsets, counts):
    return torch.stack([a.t() @ b for a, b in zip(x.split(counts), grad.split(counts))])


@pytest.mark.parametrize("experts", ["lora", "frozen"])
def test_bf16_bucketed_chain_equals_the_exact_row_counts(tiny_model_dir, monkeypatch, experts):
    """Down the real chain (4-bit experts, split expert LoRA or attention LoRA), bucketing changes nothing but
    which kernel runs: same logits and gradients as grouped_mm on the exact counts. (Against PEFT's fold in bf16 a
    near-tie token can route differently, so the fold is compared in fp32 by tests/test_expert_lora.py.)"""
    from moetune import grouped_experts

    targets = {"targets": ["experts"], "experts_path": "split"} if experts == "lora" else {"targets": ["attention"]}
    model = _bf16_4bit(tiny_model_dir, "qwen3_moe", LoraSection(r=4, **targets))
    ids = torch.randint(6, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = grouped_experts.gmm
    monkeypatch.setattr(grouped_experts, "gmm", lambda *a: calls.append(1) or real(*a))

    def to_exact_row_counts(model):
        assert calls  # the first pass did go through the bucketed matmul
        monkeypatch.setattr(grouped_experts, "gmm", _unbucketed)
        monkeypatch.setattr(grouped_experts, "gmm_weight_grad", _unbucketed_weight_grad)

    assert_same_step(model, ids, to_exact_row_counts, _close_within(1e-2))
