"""Fused experts (frozen base + LoRA) over tokens grouped by expert, a run of experts at a time, in both passes.

With T tokens routed top-k, the experts see S = T*k (token, expert) pairs. Written with plain autograd ops, the
split path's routing plumbing builds `[S, H]` tensors whose only job is to move rows around: the gathered input
`hidden[token of pair]` and, in backward, its gradient (summed over the base and every LoRA path, then
index-added into `[T, H]`); on the output side the `[S, H]` expert outputs kept for the combine weights' gradient,
and in backward the gradients of the unsort and of the `* weight` product. At S = 16384, H = 512 in fp32 each is
32 MB, several per layer, while the layer's own input and output are `[T, H]`.

So each projection is one autograd Function that walks the routed experts in runs (`Routing.runs`: consecutive
experts, at most `DEQUANT_CHUNK_BYTES` of dequantized weight and at most `max(T, ROUTED_CHUNK_BYTES / H)` pairs):

* `GatherProject` (gate_up_proj): `hidden [T, H]` -> `[S, 2I]`, or, for transformers' default gate, the two
  `[S, I]` halves as separate tensors (`act_fn(gate) * up` then runs on them, and backward never concatenates
  their gradients into a `[S, 2I]`). Per run it gathers its tokens' rows, multiplies base and LoRA, and writes its
  rows of the output; backward gathers nothing from the output side, builds the run's input gradient and
  index-adds it straight into `[T, H]`.
* `ProjectCombine` (down_proj): `h [S, I]`, combine weights `[S]` -> `[T, H]`. Per run: base + LoRA, times the
  weights, index-added into `[T, H]`. Backward gathers the run's rows of the output gradient and gets the combine
  weights' gradient from products it needs anyway (`g . y = (g W) . h + sum s (g B^T) . u`), so the expert outputs
  are never kept.

Nothing but the Function inputs is saved (`hidden` or `h`, the combine weights, the small LoRA factors): the LoRA
intermediates `u = drop(x) A` (`[n, r]`) are recomputed in backward, a 4-bit base weight is decoded again a run
at a time (`quantized_experts.run_weight`), and the LoRA dropout mask of run i is drawn from its own generator
seeded `seed + i`, so backward (and a gradient-checkpointing replay, which redraws `seed` from the restored global
RNG) regenerates exactly the same mask. The family's gate (`experts._apply_gate`) stays ordinary autograd
between the two Functions.
"""

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations.moe import _default_apply_gate  # private, but transformers is pinned to 5.23.x

from moetune import quantized_experts
from moetune.dropout_masks import apply_mask, draw_seed, keep_mask
from moetune.grouped_matmul import gmm, gmm_weight_grad
from moetune.quantized_experts import Routing, Run


# Most bytes of gathered activations (`[pairs, H]`) one run handles, unless the layer's own `[T, H]` is larger:
# the backward then never holds a routing transient bigger than that (measured: fine shape, 8 MiB keeps a run
# several experts wide for grouped_mm and the split path's backward under half of PEFT's fold).
ROUTED_CHUNK_BYTES = 8 << 20


@dataclass
class Projection:
    """One fused expert weight over the sorted pairs: its runs, its LoRA terms' scales, its dropout."""

    experts: nn.Module
    name: str
    routing: Routing
    runs: list[Run]
    scales: list[float]
    dropout: float
    seed: int | None  # dropout: run i draws its mask from a generator seeded `seed + i`
    dtype: torch.dtype
    blocks: list[int]  # the output's column blocks, returned as separate tensors (their widths sum to `out`)

    @property
    def out_features(self) -> int:
        return sum(self.blocks)

    def base(self, x: torch.Tensor, run: Run) -> list[torch.Tensor]:
        """`x_p W_e^T` for the run's pairs, one tensor per column block (one decode of a 4-bit weight)."""
        weight, offsets, counts = quantized_experts.run_weight(self.experts, self.name, run, self.dtype,
                                                               transpose=True)
        return [gmm(x, weight[..., cols], offsets, counts) for cols in self.columns()]

    def base_grad(self, grads: list[torch.Tensor], run: Run) -> torch.Tensor:
        """`sum over blocks of grad_b W_e[block b]`: the run's input gradient from its blocks' output gradients."""
        weight, offsets, counts = quantized_experts.run_weight(self.experts, self.name, run, self.dtype,
                                                               transpose=False)
        out = None
        for grad, cols in zip(grads, self.columns()):
            part = gmm(grad, weight[:, cols], offsets, counts)
            out = part if out is None else out.add_(part)
        return out

    def columns(self) -> list[slice]:
        """The output columns of each block."""
        if len(self.blocks) == 1:
            return [slice(None)]
        edges = [0, *accumulate(self.blocks)]
        return [slice(a, b) for a, b in zip(edges, edges[1:])]

    def drop(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """`x` times run i's dropout mask (the same mask every call: forward input and backward gradient alike)."""
        if self.seed is None:
            return x
        return apply_mask(x, keep_mask(x.shape, self.dropout, self.seed + i, x.device), self.dropout)


def make_projection(experts: nn.Module, name: str, routing: Routing, terms: list, dropout: float,
                    dtype: torch.dtype, width: int, halves: bool = False) -> Projection:
    """`width`: the columns of the rows a run gathers (H on both sides). `halves`: output as two column halves."""
    state = quantized_experts.plain_4bit(experts, name)
    shape = state.quant_state.shape if state is not None else getattr(experts, name).shape
    element = torch.empty(0, dtype=dtype).element_size()
    max_rows = max(routing.num_tokens, ROUTED_CHUNK_BYTES // max(width * element, 1))
    runs = routing.runs(shape[1:].numel() * element, max_rows)
    seed = None
    if dropout > 0 and terms:
        # From the global RNG, so a checkpointed forward replays it (below 2**62: seed + run stays in range).
        seed = draw_seed(routing.perm.device)
    blocks = [shape[1] // 2] * 2 if halves and shape[1] % 2 == 0 else [shape[1]]
    return Projection(experts, name, routing, runs, [scale for _, _, scale in terms], dropout, seed, dtype, blocks)


def _accumulator(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    # index_add_ rounds at every add: low-precision sums are kept in fp32 (k adds per token).
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return torch.zeros(rows, cols, dtype=dtype, device=like.device)


def _lora_forward(proj: Projection, x: torch.Tensor, run: Run, i: int, factors: tuple) -> torch.Tensor | None:
    """`sum_t s_t (drop(x) A_t) B_t` over the run's experts (None without terms)."""
    if not proj.scales:
        return None
    x = proj.drop(x, i)
    delta = None
    for t, scale in enumerate(proj.scales):
        a, b = factors[2 * t][run.first:run.last], factors[2 * t + 1][run.first:run.last]
        d = gmm(gmm(x, a, run.span_offsets, run.span_counts), b, run.span_offsets, run.span_counts) * scale
        delta = d if delta is None else delta + d
    return delta


def _lora_backward(proj: Projection, x: torch.Tensor, grad: torch.Tensor, run: Run, i: int, factors: tuple,
                   grad_factors: list, row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """Gradients of `sum_t s_t (drop(x) A_t) B_t` (each row times `row_scale`) given its output gradient `grad`.

    Fills the run's experts of `grad_factors`; returns the gradient for `x` and, per term, `u_t . (grad B_t^T) s_t`
    (row by row: what the combine weights' gradient needs).
    """
    offsets, counts = run.span_offsets, run.span_counts
    xd = proj.drop(x, i)
    grad_xd, dots = None, []
    for t, scale in enumerate(proj.scales):
        a, b = factors[2 * t][run.first:run.last], factors[2 * t + 1][run.first:run.last]
        u = gmm(xd, a, offsets, counts)  # recomputed: [n, r], cheaper than keeping
        grad_u = gmm(grad, b.transpose(1, 2), offsets, counts) * scale
        dots.append((grad_u * u).sum(-1))
        if row_scale is not None:
            grad_u = grad_u * row_scale
            u = u * row_scale
        grad_factors[2 * t + 1][run.first:run.last] = gmm_weight_grad(u, grad, offsets, counts) * scale
        grad_factors[2 * t][run.first:run.last] = gmm_weight_grad(xd, grad_u, offsets, counts)
        d = gmm(grad_u, a.transpose(1, 2), offsets, counts)
        grad_xd = d if grad_xd is None else grad_xd + d
    return proj.drop(grad_xd, i), dots


class GatherProject(torch.autograd.Function):
    """`out[p] = x_p W_e^T + sum_t s_t (drop(x_p) A_t,e) B_t,e` with `x_p = hidden[token of pair p]`: `[S, out]`,
    returned as one tensor per column block of `proj.blocks`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, proj: Projection, *factors: torch.Tensor):
        tokens = proj.routing.tokens
        outs = None
        for i, run in enumerate(proj.runs):
            x = hidden[tokens[run.rows]]  # this run's rows only
            ys = proj.base(x, run)
            delta = _lora_forward(proj, x, run, i, factors)
            if delta is not None:
                for y, cols in zip(ys, proj.columns()):
                    y.add_(delta[:, cols])
            if len(proj.runs) == 1:
                outs = ys  # one run holds every pair: its output is the whole output (no [S, out] copy)
                break
            if outs is None:
                outs = [hidden.new_empty(tokens.shape[0], width) for width in proj.blocks]
            for out, y in zip(outs, ys):
                out[run.rows] = y
        if outs is None:  # nothing routed (no tokens)
            outs = [hidden.new_empty(0, width) for width in proj.blocks]
        ctx.proj = proj
        ctx.save_for_backward(hidden, *factors)
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor):
        hidden, *factors = ctx.saved_tensors
        proj, tokens = ctx.proj, ctx.proj.routing.tokens
        grad_hidden = _accumulator(hidden.shape[0], hidden.shape[1], hidden)
        grad_factors = [torch.zeros_like(f) for f in factors]
        for i, run in enumerate(proj.runs):
            grads = [g[run.rows].contiguous() for g in grad_outs]
            grad_x = proj.base_grad(grads, run)  # sum over blocks of grad_b @ W_e[b]
            if proj.scales:
                grad = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
                grad_x.add_(_lora_backward(proj, hidden[tokens[run.rows]], grad, run, i, factors, grad_factors)[0])
            grad_hidden.index_add_(0, tokens[run.rows], grad_x.to(grad_hidden.dtype))  # straight into [T, H]
        return grad_hidden.to(hidden.dtype), None, *grad_factors


class ProjectCombine(torch.autograd.Function):
    """`out[t] = sum over t's pairs p of w_p (h_p W_e^T + sum_t s_t (drop(h_p) A_t,e) B_t,e)`: `[T, out]`."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weights: torch.Tensor, proj: Projection, *factors: torch.Tensor):
        tokens = proj.routing.tokens
        out = _accumulator(proj.routing.num_tokens, proj.out_features, h)
        for i, run in enumerate(proj.runs):
            x = h[run.rows]
            y = proj.base(x, run)[0]
            delta = _lora_forward(proj, x, run, i, factors)
            if delta is not None:
                y.add_(delta)
            out.index_add_(0, tokens[run.rows], y.mul_(weights[run.rows].unsqueeze(-1)).to(out.dtype))
        ctx.proj = proj
        ctx.save_for_backward(h, weights, *factors)
        return out.to(h.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        h, weights, *factors = ctx.saved_tensors
        proj, tokens = ctx.proj, ctx.proj.routing.tokens
        grad_h, grad_weights = torch.empty_like(h), torch.empty_like(weights)
        grad_factors = [torch.zeros_like(f) for f in factors]
        grad_out = grad_out.to(h.dtype)
        for i, run in enumerate(proj.runs):
            grad = grad_out[tokens[run.rows]]  # this run's rows of the output gradient, without the weights
            w = weights[run.rows].unsqueeze(-1)
            x = h[run.rows]
            grad_x = proj.base_grad([grad], run)  # grad @ W_e, before the weight
            # grad . (x W_e^T): the base's share of the weight's gradient (on CPU vecdot is a mul and a sum over
            # [n, in]; doing it in cache-sized row blocks measured no faster: docs/benchmarks.md)
            dot = torch.linalg.vecdot(grad_x, x)
            # Written straight into grad_h's rows (out=): elementwise temporaries of [n, in] cost more in fresh
            # pages than in arithmetic on CPU (measured, docs/benchmarks.md).
            if proj.scales:
                grad_xd, dots = _lora_backward(proj, x, grad, run, i, factors, grad_factors, row_scale=w)
                dot = dot + sum(dots)
                torch.addcmul(grad_xd, grad_x, w, out=grad_h[run.rows])
            else:
                torch.mul(grad_x, w, out=grad_h[run.rows])
            grad_weights[run.rows] = dot
        return grad_h, grad_weights, None, *grad_factors


def grouped_experts(experts: nn.Module, hidden_states: torch.Tensor, routing: Routing, weights: torch.Tensor,
                    terms: dict[str, list], dropout: float) -> torch.Tensor:
    """The experts block `[T, H]` -> `[T, H]`: gate_up_proj, the family's gate, down_proj, combined by `weights`.

    Args:
        weights: `[S]` combine weight of each sorted pair.
        terms: per parameter name, `(A^T [E, in, r], B^T [E, r, out], scale)` triples.
    """
    width = hidden_states.shape[-1]
    up = make_projection(experts, "gate_up_proj", routing, terms["gate_up_proj"], dropout, hidden_states.dtype, width,
                         halves=_default_gate(experts))
    factors = [f for a, b, _ in terms["gate_up_proj"] for f in (a, b)]
    if len(up.blocks) == 2:
        # transformers' default gate, `act_fn(gate) * up` on the two halves of one `[S, 2I]` tensor, applied to
        # two `[S, I]` tensors: the same values, and backward hands over two gradients instead of concatenating
        # them into a new `[S, 2I]` (on CPU, one above glibc's 32 MiB mmap threshold is zero-filled fresh pages on
        # every allocation: ~13 ms per layer and pass at S = 4096, I = 1024 fp32; docs/benchmarks.md). The
        # activation module is called as the default gate calls it, so hooks on it (expert dropout) still apply.
        gate, up_part = GatherProject.apply(hidden_states, up, *factors)
        h = experts.act_fn(gate) * up_part
    else:
        h = experts._apply_gate(GatherProject.apply(hidden_states, up, *factors))  # the family's own gate
    down = make_projection(experts, "down_proj", routing, terms["down_proj"], dropout, h.dtype, width)
    factors = [f for a, b, _ in terms["down_proj"] for f in (a, b)]
    return ProjectCombine.apply(h, weights.to(h.dtype), down, *factors)


def _default_gate(experts: nn.Module) -> bool:
    """Whether the experts gate with transformers' default `act_fn(gate) * up` (concatenated `[gate; up]`)."""
    return (getattr(type(experts), "_apply_gate", None) is _default_apply_gate
            and "_apply_gate" not in vars(experts) and isinstance(getattr(experts, "act_fn", None), nn.Module)
            and getattr(experts, "is_concatenated", True))
