"""Split LoRA for fused experts: the LoRA path runs on the routed tokens and no full-size delta is ever built.

PEFT 0.21 applies LoRA on a fused expert weight (`target_parameters`) by folding it into the weight: every forward
registers a parametrization `W + scale * B @ A` (one `baddbmm`), so each layer materializes a second copy of the
whole `[E, 2I, H]` / `[E, H, I]` stack, keeps it for backward, and backward builds a full-size weight gradient
before reducing it to the LoRA factors. This module computes the same function as

    y_e = x_e W_e^T + scale * (drop(x_e) A_e^T) B_e^T          for the tokens x_e routed to expert e

with the tokens sorted by expert once and every product a grouped matmul over those groups
(`torch.nn.functional.grouped_mm`, or a loop over experts where its stride rule does not hold). The base weight
(4-bit ones dequantized as usual) gets no gradient; the LoRA factors get theirs from `[tokens, r]`-sized products.
A 4-bit base weight is dequantized only for the routed experts, and again in backward instead of being kept
(`moetune.quantized_experts`). Both projections walk the routed experts a run at a time in forward and backward and
scatter their gradients straight into `[T, H]`, so no `[T*k, H]` routing tensor is built (`moetune.grouped_experts`).

Design: parameters, saving and loading stay PEFT's. `add_adapters` still creates PEFT's `ParamWrapper`s, so the
trainable tensors are PEFT's own `lora_A [r*E, in]` / `lora_B [out, r*E]` and `save_pretrained` /
`PeftModel.from_pretrained` / `load_adapter` see nothing different. `install_split_lora` only gives the
*outermost* wrapper of each experts module an instance-level `forward` (no class is patched). While adapters are
active and unmerged it runs the split computation above with the factors of every wrapper of the chain;
otherwise (adapters disabled or merged, per-batch adapter names) it hands over to PEFT's own forward.
PEFT's rank blocks (`ParamWrapper.get_delta_factors`): expert e's A is rows `e*r:(e+1)*r` of lora_A, and its B
is the *strided* columns `e, e+E, e+2E, ...` of lora_B (`lora_B.reshape(out, r, E)[..., e]`).

Dropout: PEFT refuses `lora_dropout != 0` on parameter targets because the fold cannot drop per token; here the
LoRA input of each routed (token, expert) pair is dropped independently, in training mode only (`lora.dropout`
with `lora.experts_path: split`). PEFT's config then says `lora_dropout: 0` (so any PEFT can load the adapter) and
`add_adapters` gives the Linear LoRA layers (attention, ...) the recipe's dropout itself. LoRA on some experts only: `expert_mask` zeroes the LoRA path of the others
(their factors exist, in PEFT's layout, and stay at their initial values).

Supported: the standard layout of transformers' `@use_experts_implementation` experts with concatenated
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, no bias, not transposed (mixtral, qwen2/3_moe, olmoe,
deepseek_v2/v3, ...). Others (gpt_oss: transposed + bias; dbrx, jetmoe: own layouts) raise `MoetuneError`.
`lora.experts_path: auto` takes split from `AUTO_MIN_EXPERTS` experts per layer on (measured; see there).
"""

import types

import torch
from torch import nn

from moetune.errors import MoetuneError
from moetune.grouped_experts import grouped_experts
from moetune.quantized_experts import Routing


_PARAMS = ("gate_up_proj", "down_proj")
_ATTR = "_moetune_split_lora"  # set on the outermost wrapper while the split forward is installed
# "auto" picks split from this many experts per layer on (docs/benchmarks.md#expert-lora-peft-fold-vs-split-issue-10,
# scripts/bench_train.py --suites lora). Fine-grained (64 experts, width 128): split 1.24-3.1x PEFT's fold speed in
# every run, 0.5-0.8x its step peak. Coarse (8 experts, width 1024): split 1.38-2.02x in the three runs on a quiet
# or partly quiet machine (0.77-0.85x in one run on an oversubscribed one), step peak 0.42-0.63x in all. So split
# wherever its layout is supported (`check_supported`); PEFT's fold otherwise.
AUTO_MIN_EXPERTS = 1


def _param_wrapper_type() -> type:
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def choose_path(model: nn.Module, experts_path: str, target_parameters: list[str]) -> str:
    """"peft" or "split" for `lora.experts_path` on this model ("auto" decides by shape, see `AUTO_MIN_EXPERTS`).

    Raises:
        MoetuneError: "split" asked for on an experts layout it does not support.
    """
    from moetune.architectures import find_moe_layers
    from moetune.router_capture import innermost_module

    if experts_path not in ("auto", "peft", "split"):
        raise MoetuneError(f"lora.experts_path: got {experts_path!r}; allowed: 'auto', 'peft' or 'split'")
    if experts_path == "peft" or not any(t.rpartition(".")[2] in _PARAMS for t in target_parameters):
        return "peft"
    layers = find_moe_layers(model)
    experts = innermost_module(layers[0].experts) if layers else None
    if experts_path == "split":
        for layer in layers:
            check_supported(innermost_module(layer.experts))
        return "split"
    try:
        check_supported(experts)
    except MoetuneError:
        return "peft"
    return "split" if experts.num_experts >= AUTO_MIN_EXPERTS else "peft"


def check_supported(experts: nn.Module) -> None:
    """Raise `MoetuneError` unless `experts` (the innermost experts module) has the layout split LoRA handles."""
    name = type(experts).__name__
    problems = []
    if not getattr(experts, "has_gate", False) or not getattr(experts, "is_concatenated", False):
        problems.append("no concatenated gate_up_proj")
    if getattr(experts, "is_transposed", False):
        problems.append("transposed weights")
    if getattr(experts, "has_bias", False):
        problems.append("expert biases")
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if not problems:
        for param in _PARAMS:
            if getattr(experts, param, None) is None or getattr(experts, param).dim() != 3:
                problems.append(f"no 3-D {param}")
    if problems:
        raise MoetuneError(
            f"lora.experts_path: the split expert-LoRA path does not support {name} ({', '.join(problems)}); "
            "set `lora.experts_path: peft` for this model"
        )


def _chain(outer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    wrapper_type = _param_wrapper_type()
    wrappers, module = [], outer
    while isinstance(module, wrapper_type):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _outermost_expert_wrappers(model: nn.Module) -> list[nn.Module]:
    wrapper_type = _param_wrapper_type()
    wrappers = [m for m in model.modules() if isinstance(m, wrapper_type)]
    inner = {id(w.base_layer) for w in wrappers}
    out = []
    for wrapper in wrappers:
        if id(wrapper) in inner:
            continue
        chain, base = _chain(wrapper)
        if {w.parameter_name for w in chain} <= set(_PARAMS) and hasattr(base, "gate_up_proj"):
            out.append(wrapper)
    return out


def install_split_lora(model: nn.Module, *, dropout: float = 0.0,
                       expert_mask: torch.Tensor | list[bool] | None = None) -> int:
    """Make every LoRA-adapted fused experts module of a PEFT model compute its LoRA the split way.

    Idempotent (a second call replaces the settings). `remove_split_lora` restores PEFT's forward.

    Args:
        model: a PEFT model with LoRA on `gate_up_proj` / `down_proj` of fused experts (`target_parameters`).
        dropout: dropout probability on the LoRA input of each routed token, training mode only.
        expert_mask: `[E]` booleans; experts marked False get no LoRA (None: every expert).

    Returns:
        The number of experts modules switched.

    Raises:
        MoetuneError: an experts layout the split path does not handle, or a mask of the wrong length.
    """
    installed = 0
    for outer in _outermost_expert_wrappers(model):
        _, experts = _chain(outer)
        check_supported(experts)
        mask = None
        if expert_mask is not None:
            mask = torch.as_tensor(expert_mask, dtype=torch.bool).flatten()
            if mask.numel() != experts.num_experts:
                raise MoetuneError(f"expert_mask has {mask.numel()} entries but the model has {experts.num_experts} experts")
        object.__setattr__(outer, _ATTR, {"dropout": float(dropout), "mask": mask})
        outer.forward = types.MethodType(_split_forward, outer)
        installed += 1
    return installed


def remove_split_lora(model: nn.Module) -> int:
    """Undo `install_split_lora`: PEFT's own forward again. Returns the number of modules restored."""
    removed = 0
    for outer in _outermost_expert_wrappers(model):
        if _ATTR in outer.__dict__:
            del outer.__dict__[_ATTR]
            del outer.__dict__["forward"]
            removed += 1
    return removed


def is_split(model: nn.Module) -> bool:
    """True when at least one experts module of `model` runs split LoRA."""
    return any(_ATTR in m.__dict__ for m in _outermost_expert_wrappers(model))


# ---------------------------------------------------------------------------------------------------------
# The computation


def _factors(wrapper: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's rank-r-per-expert blocks as `A^T [E, in, r]`, `B^T [E, r, out]` (out/in of the [E, out, in] weight)."""
    a = wrapper.lora_A[adapter].weight  # [r*E, in]: expert e owns rows e*r:(e+1)*r
    b = wrapper.lora_B[adapter].weight  # [out, r*E]: expert e owns columns e, e+E, e+2E, ...
    experts = wrapper.num_experts
    a_t = a.reshape(experts, -1, a.shape[-1]).transpose(1, 2)  # [E, in, r]
    b_t = b.reshape(b.shape[0], -1, experts).permute(2, 1, 0)  # [E, r, out]
    # Contiguous copies of the small factors keep grouped_mm's stride rule; they are [r*E, in]-sized.
    return a_t.contiguous(), b_t.contiguous(), wrapper.scaling[adapter]


def _lora_terms(wrapper: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [_factors(wrapper, name) for name in wrapper.active_adapters if name in wrapper.lora_A]


def _split_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                   top_k_weights: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    wrappers, experts = _chain(self)
    if (args or kwargs or top_k_index is None or top_k_weights is None
            or any(w.disable_adapters or w.merged for w in wrappers)
            or any(p.requires_grad for p in experts._parameters.values() if p is not None)):
        # Adapters off or merged, per-batch adapter names, an unexpected call, or base expert weights being trained
        # too (the split Functions give the base no gradient): PEFT's own forward.
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    settings = self.__dict__[_ATTR]
    terms = {name: [] for name in _PARAMS}
    for wrapper in wrappers:
        terms[wrapper.parameter_name] += _lora_terms(wrapper)
    return split_experts_forward(experts, hidden_states, top_k_index, top_k_weights, terms,
                                 dropout=settings["dropout"] if self.training else 0.0, expert_mask=settings["mask"])


def split_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, terms: dict[str, list], *, dropout: float = 0.0,
                          expert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The experts block output with LoRA computed on the grouped tokens (see the module docstring).

    Args:
        experts: the innermost experts module (its `gate_up_proj` / `down_proj` may be 4-bit parametrized).
        hidden_states: `[T, H]`.
        top_k_index, top_k_weights: `[T, k]` routing.
        terms: per parameter name, a list of `(A^T [E, in, r], B^T [E, r, out], scale)`.
        dropout: dropout on the LoRA input (pass 0 outside training).
        expert_mask: `[E]` booleans; False turns LoRA off for that expert.
    """
    routing = Routing(top_k_index, experts.num_experts)  # one host sync: the per-expert counts
    if expert_mask is not None and not bool(expert_mask.all()):
        # B of a masked-out expert taken as 0: its LoRA term is 0 and its factors get zero gradients.
        terms = {name: [(a_t, b_t * expert_mask.to(b_t.device, b_t.dtype).view(-1, 1, 1), scale)
                        for a_t, b_t, scale in group] for name, group in terms.items()}
    weights = top_k_weights.reshape(-1)[routing.perm]  # the combine weight of each sorted pair
    out = grouped_experts(experts, hidden_states, routing, weights, terms, dropout)
    return out.to(hidden_states.dtype)
