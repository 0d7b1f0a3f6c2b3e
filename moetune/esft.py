"""Expert-specialized fine-tuning (ESFT, arXiv 2407.01906): train only the experts the task data routes to.

Before training, the routed experts are scored on the training data (`expert_scores.score_experts`); per MoE
layer the experts in score order are selected until their cumulative share reaches `experts.select.top_p`. Only the
selected experts train: in full (their slices of the fused `[E, ...]` expert parameters), or with LoRA on the
experts (their rank blocks of PEFT's stacked `lora_A [r*E, in]` / `lora_B [out, r*E]`).

How the other experts stay exactly as they were: the expert weights are single tensors, so `requires_grad` cannot
tell experts apart. A gradient hook zeroes their rows, which keeps Adam's moments for them at exactly zero (and
keeps them out of gradient clipping), but decoupled weight decay still shrinks every row of the tensor. So after each
optimizer step the unselected slices are also written back from a copy taken before training (`ExpertMask`).
That works with any optimizer; its cost is the memory of that copy. The alternative (expert tensors in a
param group without weight decay, decay applied by hand to the selected slices) would save the copy but ties the
code to AdamW's update rule.

See docs/upstream.md#trainer-optimizer-step-callback and docs/upstream.md#peft-expert-lora-blocks.

The run dir gets `expert_selection.json` and, when trained in full, `esft_experts.safetensors` with just the selected
slices (and any other group `freeze.train` trained); `load_esft(base, run_dir)` puts them back on a fresh base.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from moetune.architectures import canonical_name, classify_parameters, find_moe_layers
from moetune.config import FreezeSection, Recipe
from moetune.errors import MoetuneError
from moetune.expert_scores import ExpertScores, score_experts
from moetune.rules import ADAPTER_GROUP


logger = logging.getLogger(__name__)

SELECTION_FILE = "expert_selection.json"
WEIGHTS_FILE = "esft_experts.safetensors"


@dataclass
class ExpertSelection:
    """The experts chosen per MoE layer, and the scores they were chosen by."""

    score: str
    top_p: float
    num_experts: int
    experts: dict[int, list[int]]
    shares: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "top_p": self.top_p, "num_experts": self.num_experts, "tokens": self.tokens,
                "experts": {str(k): v for k, v in sorted(self.experts.items())},
                "shares": {str(k): v for k, v in sorted(self.shares.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertSelection":
        return cls(score=data["score"], top_p=data["top_p"], num_experts=data["num_experts"], tokens=data.get("tokens", 0),
                   experts={int(k): list(v) for k, v in data["experts"].items()},
                   shares={int(k): list(v) for k, v in data.get("shares", {}).items()})

    def format_table(self) -> str:
        total = sum(len(v) for v in self.experts.values())
        lines = [f"expert-specialized fine-tuning: {total} of {self.num_experts * len(self.experts)} routed experts "
                 f"selected ({self.score} share, top_p {self.top_p}, scored on {self.tokens} tokens)"]
        for layer, chosen in sorted(self.experts.items()):
            share = sum(self.shares[layer][e] for e in chosen) if layer in self.shares else float("nan")
            lines.append(f"  layer {layer:>3}: experts {chosen} (share {share:.3f})")
        return "\n".join(lines)


def select_by_share(shares: list[float], top_p: float) -> list[int]:
    """Experts in descending share (ties: lower id first) until their cumulative share reaches `top_p`; sorted ids."""
    order = sorted(range(len(shares)), key=lambda e: (-shares[e], e))
    chosen, total = [], 0.0
    for expert in order:
        if total >= top_p - 1e-9:
            break
        chosen.append(expert)
        total += shares[expert]
    return sorted(chosen)


def select_experts(scores: ExpertScores, score: str, top_p: float) -> ExpertSelection:
    """ESFT's per-layer selection from measured scores (`score` is tokens or gate)."""
    shares = scores.get(score)
    return ExpertSelection(score=score, top_p=top_p, num_experts=scores.num_experts, tokens=scores.tokens,
                           experts={layer: select_by_share(values, top_p) for layer, values in shares.items()},
                           shares=dict(shares))


def esft_freeze(recipe: Recipe) -> FreezeSection:
    """The `freeze` section training uses: the recipe's, plus the routed experts when ESFT trains them in full.

    With `experts` and no `lora`, `freeze.train` lists only the *other* groups to train (none when unset), the
    routed experts are always added; `ExpertMask` then keeps the unselected ones unchanged. Otherwise unchanged.
    """
    if recipe.experts is None or recipe.lora is not None:
        return recipe.freeze
    train = list(recipe.freeze.train or [])
    return recipe.freeze.model_copy(update={"train": train + ([] if "experts" in train else ["experts"])})


# ------------------------------------------------------------------------------------------ masking the update


@dataclass
class _Frozen:
    """The unselected experts' part of one parameter: `view(tensor)[ids]` (experts on dim 0 of the view)."""

    name: str
    param: nn.Parameter
    view: Callable[[torch.Tensor], torch.Tensor]
    ids: torch.Tensor
    saved: torch.Tensor | None = None


def _expert_major(num_experts: int) -> Callable[[torch.Tensor], torch.Tensor]:
    # [E, ...] fused stacks and dbrx' [E*F, H] rows are expert-major: expert j is block j of the flat tensor.
    return lambda t: t.view(num_experts, -1)


def _lora_b_view(num_experts: int) -> Callable[[torch.Tensor], torch.Tensor]:
    # PEFT reads lora_B [out, r*E] as (out, r, E): expert j owns the columns j, j+E, j+2E, ...
    return lambda t: t.view(t.shape[0], -1, num_experts).permute(2, 0, 1)


def _lora_wrappers(experts: nn.Module) -> list[nn.Module]:
    """PEFT ParamWrappers around an experts module, outermost first (one per adapted expert parameter)."""
    found = []
    module = experts
    while module is not None:
        if hasattr(module, "lora_A") and getattr(module, "num_experts", 1) > 1:
            found.append(module)
        module = getattr(module, "base_layer", None)
    return found


def _frozen_parts(model: nn.Module, selection: ExpertSelection) -> list[_Frozen]:
    parts: list[_Frozen] = []
    num_experts = selection.num_experts
    names = {id(p): n for n, p in model.named_parameters()}
    groups = classify_parameters(model)
    for layer in find_moe_layers(model):
        unselected = sorted(set(range(num_experts)) - set(selection.experts.get(layer.index, [])))
        if not unselected:
            continue
        ids = torch.tensor(unselected, dtype=torch.long)
        wrappers = _lora_wrappers(layer.experts)
        for wrapper in wrappers:
            for adapter in wrapper.lora_A:
                a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
                parts.append(_Frozen(names[id(a)], a, _expert_major(num_experts), ids))
                parts.append(_Frozen(names[id(b)], b, _lora_b_view(num_experts), ids))
        if wrappers:
            continue
        for param in layer.experts.parameters():
            full = names[id(param)]
            if groups.get(full) == "experts" and param.requires_grad:
                if param.numel() % num_experts:
                    raise MoetuneError(f"{full} has {param.numel()} elements, not a multiple of {num_experts} experts")
                parts.append(_Frozen(full, param, _expert_major(num_experts), ids))
    return parts


class ExpertMask(TrainerCallback):
    """Keeps the unselected experts' slices (weights, and so their optimizer moments) exactly as they were.

    Gradient hooks zero their gradient rows; `on_optimizer_step` writes the saved slices back (undoing weight
    decay). Use `restore()` after any custom optimizer step outside a Trainer.
    """

    def __init__(self, model: nn.Module, selection: ExpertSelection):
        self.selection = selection
        self.parts = _frozen_parts(model, selection)
        if not any(p.param.requires_grad for p in self.parts) and self.parts:
            raise MoetuneError("expert-specialized fine-tuning found no trainable expert weights; train the experts "
                               "in full (no `lora`) or add experts to `lora.targets`")
        self._handles = []
        for part in self.parts:
            ids = part.ids.to(part.param.device)
            part.ids = ids
            part.saved = part.view(part.param.detach()).index_select(0, ids).clone()
            self._handles.append(part.param.register_hook(self._zero_rows(part)))

    @staticmethod
    def _zero_rows(part: _Frozen):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()
            part.view(grad)[part.ids] = 0
            return grad
        return hook

    @torch.no_grad()
    def restore(self) -> None:
        for part in self.parts:
            part.view(part.param.data)[part.ids] = part.saved

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------------ recipe runner hooks


def prepare_expert_selection(model: nn.Module, recipe: Recipe, train_rows, tokenizer) -> ExpertSelection | None:
    """Score the experts on the training rows and select them (None when the recipe has no `experts` section).

    Call after `freeze(model, esft_freeze(recipe), ...)` and before the trainer is built.
    """
    if recipe.experts is None:
        return None
    select = recipe.experts.select
    scores = score_experts(model, train_rows, tokenizer=tokenizer, max_tokens=select.max_tokens,
                           max_length=recipe.data.max_length, reap=False)
    selection = select_experts(scores, select.score, select.top_p)
    logger.debug("%s", selection.format_table())  # finetune prints it beside the freeze table
    return selection


def attach_expert_selection(trainer, selection: ExpertSelection | None) -> None:
    """Install the `ExpertMask` callback on the trainer and keep the selection as `trainer.expert_selection`."""
    trainer.expert_selection = selection
    if selection is None:
        return
    trainer.expert_mask = ExpertMask(trainer.model, selection)
    trainer.add_callback(trainer.expert_mask)


def save_esft(model: nn.Module, selection: ExpertSelection, out_dir: str | Path) -> None:
    """Write `expert_selection.json` and, for full training, the selected slices and other trained tensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = selection.to_dict()
    adapted = any(_lora_wrappers(layer.experts) for layer in find_moe_layers(model))
    if not adapted:
        tensors, sliced = _changed_tensors(model, selection)
        save_file(tensors, str(out / WEIGHTS_FILE))
        info["sliced"] = sliced
    (out / SELECTION_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def save_expert_selection(trainer, out_dir: str | Path) -> None:
    """`save_esft` for the recipe runner: main process only, a no-op without a selection."""
    selection = getattr(trainer, "expert_selection", None)
    if selection is not None and trainer.args.should_save:
        save_esft(trainer.accelerator.unwrap_model(trainer.model), selection, out_dir)


def _changed_tensors(model: nn.Module, selection: ExpertSelection) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Canonical name -> tensor for every trained parameter; expert stacks cut to the selected experts."""
    layer_of = {}
    for layer in find_moe_layers(model):
        for name, _ in layer.experts.named_parameters():
            layer_of[canonical_name(f"{layer.experts_name}.{name}")] = layer.index
    groups = classify_parameters(model)
    tensors, sliced = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad or groups[name] == ADAPTER_GROUP:
            continue
        key = canonical_name(name)
        if groups[name] == "experts" and key in layer_of:
            ids = torch.tensor(selection.experts.get(layer_of[key], []), dtype=torch.long, device=param.device)
            tensors[key] = param.detach().reshape(selection.num_experts, -1).index_select(0, ids).contiguous().cpu()
            sliced[key] = layer_of[key]
        else:
            tensors[key] = param.detach().contiguous().cpu()
    return tensors, sliced


def load_esft(base_model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Put an ESFT run's trained weights on a freshly loaded base; returns the model (a PeftModel for LoRA runs)."""
    run = Path(run_dir)
    selection_file = run / SELECTION_FILE
    if not selection_file.is_file():
        raise MoetuneError(f"{str(run)!r} is not an expert-specialized fine-tuning run: it has no {SELECTION_FILE}")
    if (run / "adapter_config.json").is_file():
        from moetune.adapters import load_adapter

        return load_adapter(base_model, run)
    from safetensors.torch import load_file

    info = json.loads(selection_file.read_text(encoding="utf-8"))
    selection = ExpertSelection.from_dict(info)
    sliced = info.get("sliced", {})
    params = {canonical_name(n): p for n, p in base_model.named_parameters()}
    with torch.no_grad():
        for key, value in load_file(str(run / WEIGHTS_FILE)).items():
            if key not in params:
                raise MoetuneError(f"{run / WEIGHTS_FILE} holds {key}, which this base model does not have")
            param = params[key]
            if key in sliced:
                ids = torch.tensor(selection.experts.get(int(sliced[key]), []), dtype=torch.long, device=param.device)
                param.data.view(selection.num_experts, -1)[ids] = value.to(param.device, param.dtype)
            else:
                param.data.copy_(value.to(param.dtype))
    return base_model
