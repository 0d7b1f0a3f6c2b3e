"""Router capture: forward hooks that record every MoE layer's router logits, chosen experts and padding mask.

The losses (`moetune.router_losses`) and the routing telemetry are computed from what `RouterCapture` records,
not from `outputs.router_logits`: hooks work for every family, through PEFT wrappers and through TRL's fused
LM-head forward (which returns no router logits, docs/upstream.md#trl-fused-aux-loss), and they see the experts
each token was really sent to (DeepSeek-V3 / GLM-4 pick with a bias and group limits that the logits alone do
not show).
"""

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from moetune.architectures import find_moe_layers
from moetune.router_losses import load_balancing_loss, router_z_loss


logger = logging.getLogger(__name__)


def router_output_index(model: nn.Module, router: nn.Module) -> int:
    """Which element of the router's output tuple holds the logits: transformers' own `_can_record_outputs`."""
    for module in model.modules():
        recorders = getattr(module, "_can_record_outputs", None) or {}
        entries = recorders.get("router_logits")
        if entries is None:
            continue
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            target = getattr(entry, "target_class", entry)
            if isinstance(target, type) and isinstance(router, target):
                return getattr(entry, "index", 0)
    return 0


def innermost_module(module: nn.Module) -> nn.Module:
    """The module inside PEFT wrappers (ParamWrapper / ModulesToSaveWrapper nest it as `base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


class RouterCapture:
    """Records, for each forward of `model`, every MoE layer's router logits, chosen experts and padding mask.

    Only forwards entered through `model` itself count (a root pre-hook opens the window, the root forward hook
    closes it), so gradient-checkpoint recomputation during backward does not overwrite anything.
    Listeners (`add_listener`) are called with the capture at the end of every recorded forward.

    Use as a context manager or call `remove()`.
    """

    def __init__(self, model: nn.Module):
        self.layers = find_moe_layers(model)
        self.logits: dict[int, torch.Tensor] = {}
        self.top_k_index: dict[int, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None
        self._active = False
        self._listeners: list[Callable[[RouterCapture], None]] = []
        self._handles = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]
        for layer in self.layers:
            index = router_output_index(model, innermost_module(layer.router))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer.index, index)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer.index)))

    def add_listener(self, listener: Callable[["RouterCapture"], None]) -> None:
        self._listeners.append(listener)

    def _begin(self, module, args, kwargs):
        self.logits.clear()
        self.top_k_index.clear()
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._active = True

    def _end(self, module, args, output):
        if not self._active:
            return
        self._active = False
        for listener in self._listeners:
            listener(self)

    def _router_hook(self, layer_index: int, output_index: int):
        def hook(module, args, output):
            if self._active:
                logits = output[output_index] if isinstance(output, (tuple, list)) else output
                self.logits[layer_index] = logits.reshape(-1, logits.shape[-1])
        return hook

    def _experts_hook(self, layer_index: int):
        def hook(module, args):
            # Fused experts are called as experts(hidden[T, H], top_k_index[T, k], top_k_weights[T, k])
            if self._active and len(args) >= 2 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
                self.top_k_index[layer_index] = args[1]
        return hook

    def ordered(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor | None]]:
        """(layer indices, logits, chosen experts or None), in layer order, for the last forward."""
        layers = sorted(self.logits)
        return layers, [self.logits[i] for i in layers], [self.top_k_index.get(i) for i in layers]

    def token_mask(self) -> torch.Tensor | None:
        """The flattened padding mask (True = real token) of the last forward, or None (every token counts)."""
        if self.attention_mask is None or not self.logits:
            return None
        mask = self.attention_mask.reshape(-1).bool()
        rows = next(iter(self.logits.values())).shape[0]
        if mask.numel() != rows:
            logger.warning("attention_mask has %d positions but routers saw %d tokens; counting all", mask.numel(), rows)
            return None
        return mask

    def losses(self, num_experts: int, top_k: int, scoring: Literal["softmax", "sigmoid"]) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux loss, z-loss) of the last forward; zeros when no router ran."""
        _, logits, chosen = self.ordered()
        if not logits:
            zero = torch.zeros(())
            return zero, zero
        mask = self.token_mask()
        aux = load_balancing_loss(logits, num_experts, top_k, scoring=scoring, token_mask=mask, top_k_index=chosen)
        return aux, router_z_loss(logits, token_mask=mask)

    def clear(self) -> None:
        """Drop the recorded tensors (they hold the autograd graph until then)."""
        self.logits.clear()
        self.top_k_index.clear()
        self.attention_mask = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "RouterCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
