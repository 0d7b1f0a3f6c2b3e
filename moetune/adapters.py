"""LoRA adapters targeted by parameter group, and adapter reloading onto a 4-bit or a bf16 base.

`add_adapters(model, recipe.lora)` turns group names (attention, shared_experts, dense_mlp, router, experts)
or explicit names into explicit PEFT lists of *full* names: `target_modules` for Linear layers (4-bit ones
too) and `target_parameters` for the fused 3-D expert weights and routers that are not Linear. Never
"all-linear": on several families PEFT's v4->v5 compatibility map then also adds LoRA to every expert and
the router (docs/upstream.md#peft-all-linear). Full names because PEFT's suffix matching does not see
parameters that are already parametrized (4-bit experts). Saved adapters are made portable (plain PEFT, any
working directory) by `moetune.portable_adapters`.
"""

import itertools
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from moetune import expert_lora
from moetune._compat import fix_peft_param_wrappers
from moetune.architectures import (
    canonical_name,
    classify_parameters,
    describe_moe,
    find_moe_layers,
)
from moetune.config import LoraSection
from moetune.errors import MoetuneError
from moetune.rules import LORA_GROUPS, is_adapter_name, is_expert_weight


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical module name -> module, for every nn.Linear (bitsandbytes Linear4bit is one too)."""
    return {canonical_name(name): module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not is_adapter_name(name)}


def _owner_group(model: nn.Module) -> dict[str, str]:
    """Canonical module name -> group of its weight."""
    return {canonical_name(name).rpartition(".")[0]: group for name, group in classify_parameters(model).items()
            if canonical_name(name).endswith(".weight")}


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    # Under DeepSpeed ZeRO-3 a parameter is an empty placeholder; its real shape is `ds_shape` (as PEFT reads it).
    return tuple(getattr(param, "ds_shape", param.shape))


def _router_targets(model: nn.Module, linears: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    modules, params = [], []
    for layer in find_moe_layers(model):
        for name, param in layer.router.named_parameters():
            full = canonical_name(f"{layer.router_name}.{name}")
            if len(_shape(param)) != 2 or "bias" in name:  # e.g. ernie's e_score_correction_bias [1, E] is not a weight
                continue
            owner = full.rpartition(".")[0]
            # A Linear *inside* the router (dbrx, jetmoe, hunyuan) is a plain LoRA module. A router that *is* a
            # Linear subclass (phimoe, llama4) returns a tuple, which lora.Linear cannot handle: wrap its weight.
            if owner != layer.router_name and owner in linears:
                modules.append(owner)
            else:
                params.append(full)
    return modules, params


def _expert_targets(model: nn.Module) -> list[str]:
    params = []
    for layer in find_moe_layers(model):
        for name, param in layer.experts.named_parameters():
            full = canonical_name(f"{layer.experts_name}.{name}")
            if len(_shape(param)) >= 2 and is_expert_weight(full, layer.router_name):
                params.append(full)
    return sorted(set(params))


def resolve_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """Group names / explicit names -> (target_modules, target_parameters), all as full canonical names.

    Raises:
        MoetuneError: a target that matches nothing, or a list that resolves to nothing.
    """
    linears = _linear_modules(model)
    owner_group = _owner_group(model)
    info = describe_moe(model)
    modules: set[str] = set()
    params: set[str] = set()
    for target in targets:
        before = len(modules) + len(params)
        if target == "attention":
            modules |= {n for n in linears if owner_group.get(n) == "attention"
                        and n.rpartition(".")[2] in info.attention_projections}
        elif target in ("shared_experts", "dense_mlp"):
            modules |= {n for n in linears if owner_group.get(n) == target}
        elif target == "router":
            router_modules, router_params = _router_targets(model, linears)
            modules |= set(router_modules)
            params |= set(router_params)
        elif target == "experts":
            if info.model_type == "dbrx":
                # DbrxExperts.forward reads `self.mlp.v1` directly, which PEFT's ParamWrapper hides: the first
                # forward would crash (docs/upstream.md#peft-expert-lora-limits). Say it before anything trains.
                raise MoetuneError("lora.targets: LoRA on dbrx experts is not supported (its experts module reads "
                                   "its weights directly, past PEFT's wrapper); use `freeze.train: [experts]` "
                                   "or LoRA on attention")
            params |= set(_expert_targets(model))
        else:
            modules |= {n for n in linears if n == target or n.endswith(f".{target}")}
            all_params = {canonical_name(n) for n, _ in model.named_parameters() if not is_adapter_name(n)}
            params |= {n for n in all_params if (n == target or n.endswith(f".{target}"))
                       and n.rpartition(".")[0] not in linears}
        if len(modules) + len(params) == before:
            raise MoetuneError(_nothing_message(model, target, owner_group))
    return sorted(modules), sorted(params)


def _nothing_message(model: nn.Module, target: str, owner_group: dict[str, str]) -> str:
    present = sorted(set(owner_group.values()) & set(LORA_GROUPS))
    examples = sorted({n.rpartition(".")[2] for n in _linear_modules(model)})
    return (f"lora.targets entry {target!r} matches nothing in this {model.config.model_type!r} model. "
            f"It has the groups {present} and Linear layers named {examples}; "
            "use a group name or a module/parameter name from `moetune inspect`")


def add_adapters(model: nn.Module, lora: LoraSection, *, modules_to_save: list[str] | tuple[str, ...] = ()) -> PeftModel:
    """Wrap `model` in LoRA adapters on the groups or names in `lora.targets`.

    Args:
        model: a model from `moetune.loading.load_model` (bf16 or 4-bit).
        lora: the recipe's `lora` section.
        modules_to_save: modules trained in full beside the adapters (`freezing.modules_trained_in_full`); PEFT
            saves them with the adapter and restores them on load.

    Returns:
        The PEFT model; only the LoRA parameters are trainable.

    Raises:
        MoetuneError: a target that matches nothing, `lora.dropout` != 0 with parameter targets, or a module that
            is both adapted and trained in full.
    """
    target_modules, target_parameters = resolve_targets(model, lora.targets)
    adapted = set(target_modules) | {name.rsplit(".", 1)[0] for name in target_parameters}
    both = sorted(adapted & set(modules_to_save))
    if both:
        raise MoetuneError(
            f"{len(both)} module(s) are both LoRA targets (`lora.targets`) and trained in full (`freeze`), e.g. "
            f"{both[0]}; PEFT cannot do both to one module. Drop that group from `freeze.train` or from `lora.targets`."
        )
    split = expert_lora.choose_path(model, lora.experts_path, target_parameters) == "split"
    if target_parameters and lora.dropout and lora.experts_path != "split":  # explicit, as in the recipe check
        raise MoetuneError(
            f"`lora.dropout` must be 0.0 when `lora.targets` includes experts or parameter targets (got {lora.dropout}), "
            f"unless `lora.experts_path: split`: PEFT's ParamWrapper has no dropout (targets resolved to parameters: "
            f"{target_parameters[:2]}...)"
        )
    config = LoraConfig(
        # With parameter targets PEFT refuses any lora_dropout; the split path applies it itself (below).
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0 if target_parameters else lora.dropout, bias="none",
        task_type="CAUSAL_LM", target_modules=target_modules, target_parameters=target_parameters or None,
        modules_to_save=list(modules_to_save) or None,
    )
    peft_model = get_peft_model(model, config)
    fix_peft_param_wrappers(peft_model)
    if split:
        expert_lora.install_split_lora(peft_model, dropout=lora.dropout)
        if lora.dropout and target_parameters:
            _add_linear_dropout(peft_model, lora.dropout)
    return peft_model


def _add_linear_dropout(peft_model: PeftModel, p: float) -> None:
    # The saved adapter_config says lora_dropout 0 (so plain PEFT can load it); the Linear LoRA layers get the
    # recipe's dropout here, as PEFT would have given them. Router parameter targets stay without dropout.
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for name in list(module.lora_dropout.keys()):
                module.lora_dropout[name] = nn.Dropout(p)


# ---------------------------------------------------------------------------------------------------------
# Reloading


_NESTED = re.compile(r"^(?P<root>.*?)(?P<depth>(?:\.base_layer)*)\.(?P<rest>lora_[AB]\..*)$")


def _by_wrapper_depth(state: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _NESTED.match(key)
        if match is None:
            grouped.setdefault(key, {})[-1] = {"": value}
            continue
        depth = match["depth"].count(".base_layer")
        grouped.setdefault(match["root"], {}).setdefault(depth, {})[match["rest"]] = value
    return grouped


def _key(root: str, depth: int, rest: str) -> str:
    return root if depth < 0 else f"{root}{'.base_layer' * depth}.{rest}"


def match_nesting(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename saved LoRA keys to this model's ParamWrapper nesting order.

    PEFT nests the wrappers of several parameters of one module in sorted-name order when the parameters are
    parametrized (4-bit) and in `named_parameters` order otherwise (docs/upstream.md#peft-nesting-order), so an
    adapter trained on a 4-bit base has outer/inner levels swapped relative to a bf16 base. Levels are matched by
    tensor shapes.
    """
    saved_groups, expected_groups = _by_wrapper_depth(saved), _by_wrapper_depth(expected)
    out = {}
    for root, levels in saved_groups.items():
        target = expected_groups.get(root)
        depths = sorted(levels)
        order = depths
        if target is not None and len(depths) > 1 and sorted(target) == depths:
            for perm in itertools.permutations(depths):
                if all(set(levels[d]) == set(target[p]) and all(
                        levels[d][k].shape == target[p][k].shape for k in levels[d]) for d, p in zip(depths, perm)):
                    order = list(perm)
                    break
        for depth, new_depth in zip(depths, order):
            for rest, value in levels[depth].items():
                out[_key(root, new_depth, rest)] = value
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, is_trainable: bool = False,
                 experts_path: str = "auto") -> PeftModel:
    """Load a saved LoRA adapter onto a freshly loaded base, 4-bit or bf16, whichever it was trained on.

    Args:
        model: a base model from `moetune.loading.load_model`.
        adapter_dir: a directory written by `PeftModel.save_pretrained` (or a moetune training run).
        is_trainable: keep the adapter trainable (to resume training); otherwise it is frozen.
        experts_path: how LoRA on fused experts computes ("auto", "peft", "split"; `lora.experts_path`). The
            weights are the same either way. (Resuming with split dropout: pass the model to
            `moetune.expert_lora.install_split_lora(model, dropout=...)` afterwards.)

    Returns:
        The PEFT model with the adapter's weights.

    Raises:
        MoetuneError: the directory has no adapter, or its weights do not fit this model.
    """
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise MoetuneError(f"{str(adapter_dir)!r} is not an adapter directory: it has no adapter_config.json")
    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = not is_trainable
    # get_peft_model + set_peft_model_state_dict instead of PeftModel.from_pretrained: the key layout must be
    # adapted to this base's wrapper nesting before the weights go in.
    peft_model = get_peft_model(model, config)
    fix_peft_param_wrappers(peft_model)
    expected = get_peft_model_state_dict(peft_model)
    saved = match_nesting(load_peft_weights(str(path), device="cpu"), expected)
    wrong = [k for k in saved if k in expected and saved[k].shape != expected[k].shape]
    if set(saved) != set(expected) or wrong:
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise MoetuneError(f"adapter {str(adapter_dir)!r} does not fit this model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}, wrong shape {wrong[:3]}")
    set_peft_model_state_dict(peft_model, saved)
    if expert_lora.choose_path(model, experts_path, list(config.target_parameters or ())) == "split":
        expert_lora.install_split_lora(peft_model)
    if not is_trainable:
        peft_model.eval()
    return peft_model
