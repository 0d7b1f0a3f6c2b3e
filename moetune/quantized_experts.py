"""4-bit fused experts that dequantize only the experts a batch routes to, and again in backward.

moetune stores each fused expert weight (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) as one bitsandbytes 4-bit
parametrization (`moetune.quantization`). Reading `experts.gate_up_proj` dequantizes all E experts, and
transformers' grouped_mm/eager forward does that on every forward; autograd then keeps the dequantized `[E, out, in]`
weights of every layer alive until backward. On fine-grained MoEs (64-128 small experts) that dequantization, not
the matmuls, dominates a CPU step (docs/benchmarks.md, issue 10).

Here instead, per projection:
* tokens are grouped by expert once (one host sync per layer for the per-expert counts);
* only the experts with at least one token are dequantized (bitsandbytes' own `dequantize_4bit` op on their slices:
  bitsandbytes quantizes the flattened `[E, out, in]` tensor in 64-element blocks, so expert e's packed bytes and
  absmax blocks are a contiguous row of `packed.view(E, -1)` / `absmax.view(E, -1)` whenever out*in is a multiple
  of 64; the saved format is unchanged);
* the dequantized weight is freed right after the grouped matmul and decoded again in backward (the autograd
  Functions of `moetune.grouped_experts` save no weight), a run of experts at a time (`Routing.runs`,
  `run_weight`): at most `DEQUANT_CHUNK_BYTES` of dequantized experts are ever alive.

`install_quantized_forward` gives each 4-bit experts module an instance-level `forward` (no class is patched) that
runs `expert_lora.split_experts_forward` with no LoRA terms; the split expert-LoRA path uses the same
`run_weight` for its base weights. Whenever a weight carries more than the 4-bit parametrization
(PEFT's fold registers its LoRA proxy on it) or the layout is not the standard concatenated one, the module's own
forward runs, exactly as before. `model.experts_implementation` (eager / grouped_mm / batched_mm) therefore no
longer applies to 4-bit experts of the standard layout: they always take this grouped path (the same function).
"""

import types
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from moetune.cpu_decode import decode_rows


_PARAMS = ("gate_up_proj", "down_proj")
_ATTR = "_moetune_quantized_forward"
# Most bytes of dequantized expert weights held at once: larger routed stacks are decoded and multiplied a run of
# experts at a time. 64 MiB keeps the transient small next to any real model's 4-bit weights (a whole Mixtral-8x7B
# gate_up_proj stack would be 1.9 GB in bf16, a Qwen3-30B-A3B one 0.8 GB) while a run is still many experts wide
# for fine-grained models (grouped_mm stays efficient); one expert larger than this is decoded alone.
DEQUANT_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------------
# Tokens grouped by expert


class Run(NamedTuple):
    """Consecutive routed experts taken together (`Routing.runs`)."""

    rows: slice  # their pairs in the sorted order
    first: int  # experts first..last-1 (those without pairs included): a plain weight's view
    last: int
    span_offsets: torch.Tensor  # int32 cumulative pair counts over first..last-1, for grouped_mm on that view
    span_counts: list[int]
    routed: torch.Tensor  # ids of the experts with pairs: what a 4-bit weight decodes
    offsets: torch.Tensor  # the same over the routed ones only
    counts: list[int]
    whole: bool  # every expert of the layer, each with pairs: decode the whole stack at once


class Routing:
    """Tokens grouped by expert, computed once per MoE layer forward and shared by both projections.

    Attributes:
        perm: `[T*k]` order that sorts the (token, slot) pairs by expert (stable).
        tokens: `[T*k]` token of each sorted pair (`perm // k`).
        ids_sorted: `[T*k]` expert id of each sorted pair.
        counts: per-expert pair counts (host list; the one sync of the layer).
        offsets: `[E]` int32 cumulative counts, for grouped_mm over all experts.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        ids = top_k_index.reshape(-1)
        self.num_tokens, self.num_experts = top_k_index.shape[0], num_experts
        self.ids_sorted, self.perm = torch.sort(ids, stable=True)
        self.tokens = self.perm // top_k_index.shape[1]
        counts_t = torch.bincount(self.ids_sorted, minlength=num_experts)
        self.counts = counts_t.tolist()
        self.offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)

    def runs(self, expert_bytes: int, max_rows: int) -> list[Run]:
        """The routed experts in runs of consecutive ones (each >= 1 expert) whose dequantized weights fit
        `DEQUANT_CHUNK_BYTES` and whose pairs number at most `max_rows`."""
        per_run = max(1, DEQUANT_CHUNK_BYTES // max(expert_bytes, 1))
        runs, group, rows, row = [], [], 0, 0
        for e, n in enumerate(self.counts):
            if not n:
                continue
            if group and (len(group) == per_run or rows + n > max_rows):
                runs.append(self._run(group, row, rows))
                group, row, rows = [], row + rows, 0
            group.append(e)
            rows += n
        if group:
            runs.append(self._run(group, row, rows))
        return runs

    def _run(self, routed: list[int], row: int, rows: int) -> Run:
        device = self.offsets.device
        first, last = routed[0], routed[-1] + 1
        counts = [self.counts[e] for e in routed]
        span_counts = self.counts[first:last]
        return Run(rows=slice(row, row + rows), first=first, last=last,
                   span_offsets=torch.tensor(span_counts, device=device).cumsum(0, dtype=torch.int32),
                   span_counts=span_counts, routed=torch.tensor(routed, dtype=torch.long, device=device),
                   offsets=torch.tensor(counts, device=device).cumsum(0, dtype=torch.int32), counts=counts,
                   whole=len(routed) == self.num_experts)


# ---------------------------------------------------------------------------------------------------------
# Dequantizing some experts


def plain_4bit(experts: nn.Module, name: str):
    """The `Bnb4bitParametrization` of `experts.<name>` when that is its only parametrization, else None."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    # `_modules`, not getattr: PEFT wrappers forward unknown attributes to their base layer.
    plists = experts._modules.get("parametrizations") if parametrize.is_parametrized(experts) else None
    if plists is None or name not in plists:
        return None
    plist = plists[name]
    if len(plist) != 1 or not isinstance(plist[0], Bnb4bitParametrization):
        return None  # e.g. PEFT's LoRA proxy on top: its forward must see the folded weight
    return plist[0]


def _absmax(state) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    from bitsandbytes import functional as F

    # Double quantization: absmax is itself 8-bit; 1/64 of the weight's elements, cheap to decode whole.
    return F.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _decode(packed: torch.Tensor, absmax: torch.Tensor, state, shape: list[int], dtype: torch.dtype, *,
            reuse: bool = False) -> torch.Tensor:
    # Always decoded as rows of whole blocks, never in the weight's 3-D shape: bitsandbytes 0.50.2's CPU kernel decodes blocks
    # per row of the shape it is given, so a last dim that is not a multiple of 64 (an expert width of 32, 96, 160)
    # pairs values with the wrong absmax (rel. error 0.17-0.25 instead of nf4's 0.09; tests/test_quantized_experts.py).
    rows, length = (1, shape[0]) if len(shape) == 1 else shape
    out = decode_rows(packed, absmax, state.blocksize, state.quant_type, rows, length, dtype, reuse=reuse)
    return out.view(shape)


def _row_length(per_expert: int, blocksize: int) -> int:
    # Rows of whole 64-blocks (never the weight's own last dim, see `_decode`); bitsandbytes' CPU kernel runs rows in
    # parallel, so long expert rows are cut to <= 16384 elements (measured: one flat row 15 ms, rows 9.5 ms for 8.4M).
    length = per_expert
    while length > 16384 and length % 2 == 0 and (length // 2) % blocksize == 0:
        length //= 2
    return length


def _decode_all(packed: torch.Tensor, state, dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    per_expert = torch.Size(state.shape[1:]).numel()
    numel = state.shape.numel()
    if per_expert % state.blocksize:
        shape = [numel]  # blocks straddle experts: one flat row
    else:
        length = _row_length(per_expert, state.blocksize)
        shape = [numel // length, length]
    return _decode(packed, _absmax(state).float(), state, shape, dtype, reuse=reuse).view(state.shape)


def dequantize_experts(experts: nn.Module, name: str, routed: torch.Tensor | None, dtype: torch.dtype, *,
                       reuse: bool = False) -> torch.Tensor:
    """Dequantize experts `routed` (all when None) of the 4-bit `experts.<name>` to `[len(routed), out, in]`.

    `reuse`: decode into the shared CPU workspace (`moetune.cpu_decode`); the result is then only valid until the
    next reusing decode, for a caller that uses it at once and keeps nothing.
    """
    state = plain_4bit(experts, name).quant_state
    packed = experts.parametrizations[name].original
    num_experts, per_expert = state.shape[0], torch.Size(state.shape[1:]).numel()
    if routed is None or per_expert % state.blocksize:
        # Every expert, or blocks that straddle experts: the whole stack (a workspace only when it is what is asked).
        full = _decode_all(packed, state, dtype, reuse=reuse and routed is None)
        return full if routed is None else full.index_select(0, routed)
    rows = packed.view(num_experts, -1).index_select(0, routed)  # expert e: bytes e*per/2 ... (e+1)*per/2
    scales = _absmax(state).float().view(num_experts, -1).index_select(0, routed).reshape(-1)
    length = _row_length(per_expert, state.blocksize)  # the same rows as `_decode_all`: the same values, bit for bit
    out = _decode(rows, scales, state, [routed.numel() * per_expert // length, length], dtype, reuse=reuse)
    return out.view(routed.numel(), *state.shape[1:])


_FLAT_CLASS = None


def use_flat_decoding(parametrization: nn.Module) -> None:
    """Make a bitsandbytes `Bnb4bitParametrization` decode its weight as flat rows (see `_decode`).

    Reading `experts.gate_up_proj` (PEFT's fold, merging, any whole-stack use) then gives the same values as the
    routed path. Only the class changes (a subclass): the stored tensors and state-dict format do not.
    """
    global _FLAT_CLASS
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    if _FLAT_CLASS is None:
        class FlatBnb4bitParametrization(Bnb4bitParametrization):
            @torch.no_grad()
            def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
                return _decode_all(quantized_param, self.quant_state, self.quant_state.dtype)

        _FLAT_CLASS = FlatBnb4bitParametrization
    parametrization.__class__ = _FLAT_CLASS


def run_weight(experts: nn.Module, name: str, run: "Run", dtype: torch.dtype, *, transpose: bool):
    """`(w [G, in, out], offsets, counts)` for `gmm` over the pairs of `run`: `W_e^T` (`transpose`) or `W_e`.

    A frozen 4-bit weight: only the run's routed experts, decoded into the reused CPU workspace, so the result is
    valid until the next decode and must be used at once and not kept (each run's weight is read by one grouped
    matmul). A plain weight: a view of the run's span of experts (those without pairs get empty groups).
    """
    if plain_4bit(experts, name) is not None:
        weight = dequantize_experts(experts, name, None if run.whole else run.routed, dtype, reuse=True)
        offsets, counts = run.offsets, run.counts
    else:
        weight = getattr(experts, name)[run.first:run.last].detach()  # frozen: no base-weight gradient
        offsets, counts = run.span_offsets, run.span_counts
    return (weight.transpose(1, 2) if transpose else weight), offsets, counts


# ---------------------------------------------------------------------------------------------------------
# The experts forward for attention-only QLoRA (no LoRA on the experts)


def _standard_layout(experts: nn.Module) -> bool:
    return (getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
            and not getattr(experts, "is_transposed", False) and not getattr(experts, "has_bias", False)
            and not getattr(experts, "has_post_expert_norm", False) and hasattr(experts, "num_experts"))


def _quantized_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                       top_k_weights: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    if (args or kwargs or top_k_index is None or top_k_weights is None or getattr(self, "_is_expert_parallel", False)
            or any(plain_4bit(self, name) is None for name in _PARAMS)):
        # PEFT's fold proxy on a weight, expert parallelism, an unexpected call: the family's own forward.
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    from moetune.expert_lora import split_experts_forward

    return split_experts_forward(self, hidden_states, top_k_index, top_k_weights, {name: [] for name in _PARAMS})


def install_quantized_forward(model: nn.Module) -> int:
    """Give every 4-bit experts module of the standard fused layout the dequantize-routed-only forward.

    Idempotent. Returns the number of experts modules switched (others keep their own forward).
    """
    installed = 0
    for module in model.modules():
        if (_standard_layout(module) and all(plain_4bit(module, n) is not None for n in _PARAMS)
                and _ATTR not in module.__dict__):
            object.__setattr__(module, _ATTR, True)
            module.forward = types.MethodType(_quantized_forward, module)
            installed += 1
    return installed


def remove_quantized_forward(model: nn.Module) -> int:
    """Undo `install_quantized_forward` (the family's forward, which dequantizes every expert). Returns the count."""
    removed = 0
    for module in model.modules():
        if _ATTR in module.__dict__:
            del module.__dict__[_ATTR]
            del module.__dict__["forward"]
            removed += 1
    return removed
