"""The MoE architecture map: which parameter is what, for every transformers-v5 MoE family.

Family differences are data (`SPECS`), not classes. A family's spec names where its MoE block sits in a decoder
layer and, inside that block, the router, the routed experts and any shared experts. Everything else is found
structurally (norm modules by class, attention by name, non-MoE layers by the absence of experts), so the same
code covers plain, PEFT-wrapped and 4-bit-parametrized models. Families missing from the table get a structural
guess (stacked 3-D expert weights, an [E, H] router) with a warning that says what was guessed.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from moetune.errors import MoetuneError
from moetune.rules import ADAPTER_GROUP as ADAPTER_GROUP  # group names: owned by moetune.rules, re-exported here
from moetune.rules import BASE_GROUPS as BASE_GROUPS
from moetune.rules import GROUPS as GROUPS
from moetune.rules import MIXER_GROUPS as MIXER_GROUPS
from moetune.rules import is_adapter_name, is_expert_param


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoESpec:
    """Where one family keeps its MoE parts. Names are attribute paths."""

    block: str = "mlp"  # the MoE block, relative to a decoder layer
    router: str = "gate"  # relative to the block
    experts: str = "experts"  # relative to the block; "" when the block itself holds the expert weights (JetMoE)
    shared: tuple[str, ...] = ()  # shared experts (and their gates), relative to the block
    layer_shared: tuple[str, ...] = ()  # shared experts that sit beside the block, relative to the layer
    mixers: tuple[tuple[str, str], ...] = ()  # (layer attribute, group) of non-attention mixers
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    computes_aux_loss: bool = True  # does the model add a load-balancing loss itself when output_router_logits
    aux_coef_attr: str | None = "router_aux_loss_coef"  # live coef on *ForCausalLM (docs/upstream.md#aux-loss-coefficient)
    uses_experts_implementation: bool = True  # experts decorated with @use_experts_implementation
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")  # DeepSeek multi-head latent attention
_NO_AUX = dict(computes_aux_loss=False, aux_coef_attr=None)

SPECS: dict[str, MoESpec] = {
    "mixtral": MoESpec(),
    "minimax": MoESpec(attention_projections=("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "out_proj", "output_gate")),
    "qwen2_moe": MoESpec(shared=("shared_expert", "shared_expert_gate")),
    "qwen3_moe": MoESpec(),
    "qwen3_next": MoESpec(shared=("shared_expert", "shared_expert_gate"), mixers=(("linear_attn", "linear_attention"),)),
    "olmoe": MoESpec(),
    "flex_olmo": MoESpec(),
    "deepseek_v2": MoESpec(shared=("shared_experts",), attention_projections=_MLA, **_NO_AUX),
    "deepseek_v3": MoESpec(shared=("shared_experts",), scoring="sigmoid", attention_projections=_MLA, **_NO_AUX),
    "glm4_moe": MoESpec(shared=("shared_experts",), scoring="sigmoid", **_NO_AUX),
    "ernie4_5_moe": MoESpec(shared=("shared_experts",)),
    "hunyuan_v1_moe": MoESpec(shared=("shared_mlp",), **_NO_AUX),
    "gpt_oss": MoESpec(router="router"),
    "granitemoe": MoESpec(block="block_sparse_moe", router="router"),
    "granitemoeshared": MoESpec(block="block_sparse_moe", router="router", layer_shared=("shared_mlp",)),
    "phimoe": MoESpec(router="router"),
    "jamba": MoESpec(block="feed_forward", router="router", mixers=(("mamba", "mamba"),)),
    "llama4_text": MoESpec(block="feed_forward", router="router", shared=("shared_expert",), scoring="sigmoid",
                           uses_experts_implementation=False, **_NO_AUX),
    "dbrx": MoESpec(block="ffn", router="router", uses_experts_implementation=False,
                    attention_projections=("Wqkv", "out_proj")),
    "jetmoe": MoESpec(router="router", experts="", aux_coef_attr="aux_loss_coef", uses_experts_implementation=False,
                      attention_projections=("kv_proj",)),
}
SPECS["llama4"] = SPECS["llama4_text"]

_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k")


@dataclass
class MoELayer:
    """One decoder layer's MoE parts, as live modules."""

    index: int
    block_name: str
    block: nn.Module
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    shared: list[tuple[str, nn.Module]] = field(default_factory=list)


@dataclass
class MoEInfo:
    """What training code needs to know about a model's MoE layers."""

    model_type: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    num_layers: int
    router_scoring: Literal["softmax", "sigmoid"]
    model_computes_aux_loss: bool
    aux_coef_attr: str | None
    uses_experts_implementation: bool
    expert_param_names: tuple[str, ...]
    attention_projections: tuple[str, ...]
    norm_topk_prob: bool | None
    guessed: bool  # True when the family is not in SPECS and the layout was found structurally


_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_WRAPPER_PARTS = re.compile(r"\.(base_layer|modules_to_save\.default|original_module)(?=\.|$)")
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original\d*$")


def canonical_name(name: str) -> str:
    """The parameter's name in the unwrapped model: strips PEFT wrappers and torch parametrizations."""
    name = _PEFT_PREFIX.sub("", name)
    name = _WRAPPER_PARTS.sub("", name)
    return _PARAMETRIZED.sub(r".\1", name)


def _model_type(config) -> str:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.model_type


def _config_value(config, keys: tuple[str, ...]):
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, getattr(text_config, "ffn_config", None)):  # dbrx nests its MoE keys in ffn_config
        for key in keys:
            value = getattr(source, key, None) if source is not None else None
            if value is not None:
                return max(value) if isinstance(value, (list, tuple)) else int(value)
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the longest ModuleList whose name ends in layers/blocks/h."""
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layers|blocks|h)$", name)
    ]
    if not candidates:
        raise MoetuneError(f"cannot find the decoder layers of {type(model).__name__}: no `layers`/`blocks` ModuleList")
    return max(candidates, key=lambda item: len(item[1]))


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _guess_spec(layers: nn.ModuleList, num_experts: int | None) -> MoESpec | None:
    """Structural guess for a family missing from SPECS: a block holding stacked expert weights and a router."""
    for layer in layers:
        for block_attr, block in layer.named_children():
            for child_attr, child in block.named_children():
                stacked = [p for p in child.parameters(recurse=False) if p.dim() == 3]
                if stacked and (num_experts is None or stacked[0].shape[0] == num_experts):
                    experts_count = stacked[0].shape[0]
                    router = next((name for name, sibling in block.named_children() if sibling is not child and any(
                        p.dim() == 2 and p.shape[0] == experts_count for p in sibling.parameters())), None)
                    if router is not None:
                        shared = tuple(n for n in dict(block.named_children()) if "shared" in n)
                        return MoESpec(block=block_attr, router=router, experts=child_attr, shared=shared,
                                       computes_aux_loss=False, aux_coef_attr=None)
    return None


def _spec_for(model: nn.Module) -> tuple[MoESpec, bool]:
    model = _unwrap(model)
    model_type = _model_type(model.config)
    if model_type in SPECS:
        return SPECS[model_type], False
    _, layers = _decoder_layers(model)
    spec = _guess_spec(layers, _config_value(model.config, _NUM_EXPERTS_KEYS))
    if spec is None:
        raise MoetuneError(
            f"{model_type!r} is not a Mixture-of-Experts model: no decoder layer holds routed experts and a router"
        )
    logger.warning(
        "moetune has no map for model_type %r; guessed from the structure: MoE block `%s`, router `%s`, experts `%s`, "
        "shared %s, softmax scoring, no model-side aux loss. Check `moetune inspect` before training.",
        model_type, spec.block, spec.router, spec.experts, list(spec.shared) or "none",
    )
    return spec, True


@dataclass
class MoELayout:
    """Where a model's MoE parts are, worked out once per model: its spec, decoder layers and MoE layers."""

    model_type: str
    spec: MoESpec
    guessed: bool
    layers_name: str
    layers: nn.ModuleList
    num_layers: int
    moe_layers: list[MoELayer]

    def is_current(self, base: nn.Module) -> bool:
        """Still true of `base`: same family, and the same module objects at every recorded path."""
        if _model_type(base.config) != self.model_type or _get(base, self.layers_name) is not self.layers:
            return False
        return len(self.layers) == self.num_layers and all(
            _moe_layer(self.layers[layer.index], layer.index, self.layers_name, self.spec) == layer
            for layer in self.moe_layers
        )


_LAYOUT_ATTR = "_moetune_moe_layout"


def moe_layout(model: nn.Module) -> MoELayout:
    """The MoE layout of a (possibly PEFT-wrapped) model, computed on first use and kept on the model.

    Why a cache on the model rather than a layout passed by every caller: `trainer.py`, `training.py`, telemetry
    and router controls each ask for the layout of the same model, and a value kept on the model reaches all of
    them with unchanged signatures. The risk is a stale layout: PEFT replaces modules in place (the experts
    become a `ParamWrapper`, a `modules_to_save` router a `ModulesToSaveWrapper`) while the model object stays
    the same. So every use first checks that the recorded block, router, experts and shared modules are still the
    objects found at their paths (a few getattr per MoE layer, no module walk), and recomputes when one is not.
    Parameter names are never cached: callers still read `named_parameters()` live.

    Raises:
        MoetuneError: the model is not MoE.
    """
    base = _unwrap(model)
    layout = base.__dict__.get(_LAYOUT_ATTR)
    if layout is None or not layout.is_current(base):
        layout = _compute_layout(base)
        object.__setattr__(base, _LAYOUT_ATTR, layout)  # a plain attribute: not a submodule, not in the state dict
    return layout


def _moe_layer(layer: nn.Module, index: int, layers_name: str, spec: MoESpec) -> MoELayer | None:
    block = _get(layer, spec.block)
    router = _get(block, spec.router) if block is not None else None
    experts = _get(block, spec.experts) if block is not None else None
    if router is None or experts is None:
        return None  # a dense layer
    prefix = f"{layers_name}.{index}"
    block_name = f"{prefix}.{spec.block}"
    shared = [(f"{block_name}.{n}", _get(block, n)) for n in spec.shared if _get(block, n) is not None]
    shared += [(f"{prefix}.{n}", _get(layer, n)) for n in spec.layer_shared if _get(layer, n) is not None]
    return MoELayer(
        index=index, block_name=block_name, block=block,
        router_name=f"{block_name}.{spec.router}", router=router,
        experts_name=f"{block_name}.{spec.experts}".rstrip("."), experts=experts, shared=shared,
    )


def _compute_layout(base: nn.Module) -> MoELayout:
    spec, guessed = _spec_for(base)
    layers_name, layers = _decoder_layers(base)
    found = [m for index, layer in enumerate(layers) if (m := _moe_layer(layer, index, layers_name, spec)) is not None]
    if not found:
        raise MoetuneError(f"{_model_type(base.config)!r} has no MoE layers: no layer has both a router and experts")
    return MoELayout(model_type=_model_type(base.config), spec=spec, guessed=guessed, layers_name=layers_name,
                     layers=layers, num_layers=len(layers), moe_layers=found)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every decoder layer that has routed experts, with its block, router, experts and shared experts."""
    return list(moe_layout(model).moe_layers)


def describe_moe(model: nn.Module) -> MoEInfo:
    """Number of experts, top-k, MoE layers, router scoring and aux-loss facts of a (possibly wrapped) model."""
    base = _unwrap(model)
    layout = moe_layout(base)
    spec = layout.spec
    config = base.config.get_text_config()
    num_experts = _config_value(config, _NUM_EXPERTS_KEYS)
    top_k = _config_value(config, _TOP_K_KEYS)
    if num_experts is None or top_k is None:
        raise MoetuneError(f"cannot read the number of experts / top-k from the {config.model_type!r} config")
    experts = layout.moe_layers[0].experts
    # Relative names; JetMoE keeps its router inside the module that holds the expert weights.
    expert_params = tuple(sorted({canonical_name(n) for n, _ in experts.named_parameters()
                                  if is_expert_param(n, spec.router)}))
    return MoEInfo(
        model_type=config.model_type, num_experts=num_experts, top_k=top_k,
        moe_layers=[layer.index for layer in layout.moe_layers], num_layers=layout.num_layers,
        router_scoring=spec.scoring, model_computes_aux_loss=spec.computes_aux_loss, aux_coef_attr=spec.aux_coef_attr,
        uses_experts_implementation=spec.uses_experts_implementation and hasattr(experts, "is_concatenated"),
        expert_param_names=expert_params, attention_projections=spec.attention_projections,
        norm_topk_prob=getattr(config, "norm_topk_prob", None), guessed=layout.guessed,
    )


_NORM_CLASS = re.compile(r"Norm", re.IGNORECASE)
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_LINEAR_ATTENTION_CLASS = re.compile(r"LinearAttention|Lightning|GatedDeltaNet", re.IGNORECASE)


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """Map every parameter name (as `model.named_parameters()` gives it) to exactly one group.

    Raises:
        MoetuneError: the model is not MoE, or a parameter fits no group (a family this map does not know yet).
    """
    base = _unwrap(model)
    layout = moe_layout(base)
    spec, layers_name, layers = layout.spec, layout.layers_name, layout.layers
    moe_indices = {layer.index for layer in layout.moe_layers}
    modules = dict(base.named_modules())
    groups: dict[str, str] = {}
    unplaced = []
    for name, _param in model.named_parameters():
        if is_adapter_name(name):
            groups[name] = ADAPTER_GROUP
            continue
        canonical = canonical_name(name)
        owner = modules.get(canonical.rsplit(".", 1)[0])
        owner = getattr(owner, "original_module", owner)  # PEFT's modules_to_save wrapper: the module it copies
        group = _group_of(canonical, owner, spec, layers_name, layers, moe_indices)
        if group is None:
            unplaced.append(canonical)
        groups[name] = group
    if unplaced:
        raise MoetuneError(
            f"{len(unplaced)} parameter(s) of {base.config.model_type!r} fit no group, e.g. {unplaced[:3]}; "
            "the architecture map needs an entry for this family"
        )
    return groups


def _group_of(name: str, owner: nn.Module | None, spec: MoESpec, layers_name: str, layers: nn.ModuleList,
              moe_indices: set[int]) -> str | None:
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if name.startswith("lm_head.") or name.startswith("output."):
        return "lm_head"
    if owner is not None and _NORM_CLASS.search(type(owner).__name__):
        return "norm"
    match = re.match(rf"^{re.escape(layers_name)}\.(\d+)\.(.+)$", name)
    if match is None:
        return None
    index, rest = int(match.group(1)), match.group(2)
    if _within(rest, spec.block):
        inner = rest[len(spec.block) + 1:]
        if index not in moe_indices:
            return "dense_mlp"
        if _within(inner, spec.router) or "router" in inner.split(".") and _ATTENTION_NAME.search(rest):
            return "router"
        if any(_within(inner, shared) for shared in spec.shared):
            return "shared_experts"
        if spec.experts == "" or _within(inner, spec.experts):
            return "experts"
        return None
    if any(_within(rest, shared) for shared in spec.layer_shared):
        return "shared_experts"
    for attr, group in spec.mixers:
        if _within(rest, attr):
            return group
    top = rest.split(".", 1)[0]
    if _ATTENTION_NAME.search(top):
        if ".router." in f".{rest}.":  # JetMoE's mixture-of-attention heads have a router of their own
            return "router"
        attention_module = layers[index].get_submodule(top)
        inner_attention = getattr(attention_module, "attn", attention_module)  # dbrx nests attn in norm_attn_norm
        if _LINEAR_ATTENTION_CLASS.search(type(inner_attention).__name__):
            return "linear_attention"
        return "attention"
    return None


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def group_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> parameter names, in `named_parameters()` order; only non-empty groups."""
    grouped: dict[str, list[str]] = {}
    for name, group in classify_parameters(model).items():
        grouped.setdefault(group, []).append(name)
    return grouped
