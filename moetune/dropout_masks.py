"""Dropout masks that are cheap to draw on CPU and can be drawn again, identically, from a seed.

Expert dropout and the dropout on expert LoRA inputs mask `[routed pairs, width]` activations, millions of elements
per layer. On CPU, `F.dropout` calls `bernoulli_` (one floating-point draw per element), and even
`torch.randint` draws from torch's mt19937 one 32-bit number at a time on one thread: 11 ms for the 4M 16-bit draws
of a `[4096, 1024]` activation, more than the expert matmul it follows costs in elementwise work
(docs/benchmarks.md). numpy's SFC64 bit generator gives the same bits in 2.7 ms, four 16-bit draws per 64-bit
output. Its seed comes from torch's global RNG, so `torch.manual_seed` still makes a run reproducible and a
gradient-checkpointing replay (which restores torch's RNG state) draws the same mask.

The drop probability is `p` rounded to a multiple of 1/65536; kept values are scaled by the exact 1/(1 - that).
Off CPU the mask is drawn by torch on the tensor's device (a generator seeded the same way).
"""

import numpy as np
import torch


def draw_seed(device: torch.device | str = "cpu") -> int:
    """A mask seed from torch's global RNG (below 2**62, so `seed + i` stays a valid seed)."""
    return int(torch.randint(0, 2**62, (), device=device))


def _threshold(p: float) -> int:
    return min(round(p * 65536), 65535)


def keep_scale(p: float) -> float:
    """The factor kept values are multiplied by: 1 / (1 - p rounded to 1/65536)."""
    return 65536 / (65536 - _threshold(p))


def keep_mask(shape: torch.Size | tuple, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Booleans, True where an element is kept (probability 1 - p); the same `seed` gives the same mask."""
    numel = int(torch.Size(shape).numel())
    device = torch.device(device)
    if device.type != "cpu":
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(shape, device=device, generator=gen) >= _threshold(p) / 65536
    raw = np.random.SFC64(seed).random_raw((numel + 3) // 4)  # uint64: four 16-bit draws each
    draws = torch.from_numpy(raw.view(np.int16))[:numel]  # no copy
    return (draws >= _threshold(p) - 32768).view(shape)


def apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with dropped elements zeroed and kept ones scaled (no autograd: for use inside autograd Functions)."""
    # The mask cast to x's dtype, then multiplied by x and by the scale in place (x first: in bf16 the scale is
    # applied at full precision, rounded once): vectorized passes over one fresh tensor. torch's boolean-indexed
    # kernels (`where(keep, x, 0)`, `masked_fill`) and `x * keep` (a mixed-dtype multiply) are 2-8x slower on CPU
    # (measured: [4096, 1024] fp32, 1.7 vs 3.0 ms for `where` + scale).
    return keep.to(x.dtype).mul_(x).mul_(keep_scale(p))


class _Dropout(torch.autograd.Function):
    # Saves the boolean mask (1 byte per element) rather than a full-precision factor tensor as `x * mask` would.
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(keep)
        return apply_mask(x, keep, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return apply_mask(grad, keep, ctx.p), None, None


def dropout(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout of `x` (training mode) with a mask from `seed` (drawn from torch's RNG when None)."""
    if p == 0.0:
        return x
    if seed is None:
        seed = draw_seed(x.device)
    return _Dropout.apply(x, keep_mask(x.shape, p, seed, x.device), p)
