"""Grouped matmuls over rows sorted by expert: `x[rows of group g] @ w[g]` for every group g.

torch's `grouped_mm` does this in one call on CUDA (SM80+) and on CPU. On CPU in bf16 it multiplies each group with
oneDNN, and oneDNN JIT-compiles a kernel (a "primitive") for every distinct matrix shape and caches it
(docs/upstream.md#onednn-primitive-per-shape). A group's row count is its expert's token count, which changes with
every batch, so a MoE layer compiles a handful of new primitives per step: each costs 1-2 ms of compilation on a
2-3 ms matmul, and the caches (1024 entries each in oneDNN and in PyTorch's ideep layer) kept growing a training
process by ~10 MB per step (H512, 4 layers) until their 1024 entries are full. Here, on CPU in bf16, each group is
multiplied over its row count rounded up to one of 16 sizes per doubling (`bucket_rows`), so every layer reuses
the same few primitives: the extra rows are the next groups' rows (or a zero tail), whose products are overwritten
by those groups (processed in order) or dropped. The LoRA weight gradients, where the row count is the inner
dimension, multiply zero-padded copies (100 random routings: 17 instead of 181 MB kept, 0.7 instead of 2.1 ms a
call). Measured (H1024, 8 layers, 4-bit, batch 1 x 512): the process stays flat instead of growing 30-60 MB per
step, for ~3% more matmul work (docs/benchmarks.md). fp32 `grouped_mm` and fp16 on CPU take other kernels, which
cache nothing per shape (measured): they are left alone.
"""

from itertools import accumulate

import torch


def bucket_rows(n: int) -> int:
    """`n` rounded up to a multiple of 8 below 128 rows, else to one of 16 sizes per doubling (<= 6.25% extra)."""
    step = max(8, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


def _compiles_per_shape(x: torch.Tensor) -> bool:
    """Whether torch multiplies `x` with a kernel compiled per matrix shape (oneDNN: bf16 on CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _aligned(*tensors: torch.Tensor) -> bool:
    # grouped_mm's CPU kernel wants every non-unit stride on a 16-byte boundary (and 16-byte-aligned data).
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _grouped_mm_for(a: torch.Tensor, b: torch.Tensor):
    """torch's grouped_mm when it exists and can take `a @ b` on their device, else None."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    # The device conditions of transformers' `_can_use_grouped_mm` (CUDA from SM80 on, CPU), and aligned strides on
    # both: torch checks them the same way on either device, and views such as one half of a fused weight may miss.
    usable = _aligned(a, b) and (a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) >= (8, 0)
                                 or a.device.type == "cpu")
    return grouped if usable else None


def _bucketed_gmm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    rows = x.shape[0]
    spare = max((bucket_rows(n) - n for n in counts if n), default=0)
    out = x.new_empty(rows + spare, w.shape[-1])  # the last group's extra rows land in the spare tail
    start = 0
    for g, n in enumerate(counts):
        if not n:
            continue
        m = bucket_rows(n)
        if start + m <= rows:
            a = x[start:start + m]  # this group's rows and the next groups' (their products are overwritten)
        else:
            a = x.new_zeros(m, x.shape[1])
            a[:rows - start] = x[start:]
        torch.mm(a, w[g], out=out[start:start + m])
        start += n
    return out[:rows]


def gmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`x[rows of group g] @ w[g]` for each group g; `x [S, in]` sorted by group, `w [G, in, out]`, `counts [G]`."""
    w = w.to(x.dtype)
    if _compiles_per_shape(x):
        return _bucketed_gmm(x, w, counts)
    grouped = _grouped_mm_for(x, w)
    if grouped is not None:
        return grouped(x, w, offs=offsets)
    pieces, start = [], 0
    for g, n in enumerate(counts):
        if n:
            pieces.append(x[start:start + n] @ w[g])
        start += n
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


def _bucketed_weight_grad(x: torch.Tensor, grad: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # Here the row count is the inner dimension, so the extra rows must contribute nothing: both operands are laid
    # out again with each group's rows followed by zero rows up to its bucket (one index_copy_ each).
    padded = [bucket_rows(n) if n else 0 for n in counts]
    starts = list(accumulate(padded, initial=0))
    rows = torch.cat([torch.arange(start, start + n) for start, n in zip(starts, counts)])  # each row's new place
    xp = x.new_zeros(starts[-1], x.shape[1]).index_copy_(0, rows, x)
    gp = grad.new_zeros(starts[-1], grad.shape[1]).index_copy_(0, rows, grad)
    out = x.new_zeros(len(counts), x.shape[1], grad.shape[1])
    for g, (start, m) in enumerate(zip(starts, padded)):
        if m:
            torch.mm(xp[start:start + m].t(), gp[start:start + m], out=out[g])
    return out


def gmm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`x[rows of g]^T @ grad[rows of g]` for each group g: `[G, in, out]` (zeros for empty groups)."""
    if _compiles_per_shape(x):
        return _bucketed_weight_grad(x, grad, counts)
    x_t = x.t()
    grouped = _grouped_mm_for(x_t, grad)
    if grouped is not None:
        return grouped(x_t, grad, offs=offsets)
    out, start = x.new_zeros(len(counts), x.shape[1], grad.shape[1]), 0
    for g, n in enumerate(counts):
        if n:
            out[g] = x_t[:, start:start + n] @ grad[start:start + n]
        start += n
    return out
