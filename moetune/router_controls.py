"""Router jitter, fp32 routers and expert dropout, for every family `find_moe_layers` knows.

Nothing here replaces a module: routers keep their class (transformers records `router_logits` by router class,
docs/upstream.md#fused-experts) and experts keep theirs (4-bit parametrized experts too). Everything is undone by `RouterControls.remove()`.
Applying controls again to the same model first removes the previous ones, so the recipe runner and `MoETrainer`
can both call `apply_router_controls` safely.
"""

import functools
import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _default_apply_gate  # private, but transformers is pinned to 5.23.x

from moetune import dropout_masks
from moetune.architectures import find_moe_layers
from moetune.config import MoESection
from moetune.errors import MoetuneError
from moetune.router_capture import innermost_module, router_output_index


logger = logging.getLogger(__name__)

_ATTR = "_moetune_router_controls"  # where the live handle sits on the model, so a second call replaces it
_ACTIVATION_ATTRS = ("act_fn", "activation_fn", "activation", "act")


class RouterControls:
    """Handle returned by `apply_router_controls`: `remove()` restores the model exactly as it was."""

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def _add(self, undo) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo() if callable(undo) else undo.remove()
        self._undo.clear()


def apply_router_controls(model: nn.Module, moe: MoESection) -> RouterControls:
    """Install router jitter, fp32 routing and expert dropout on every MoE layer of `model`.

    * `moe.router_jitter`: the router's input is multiplied by U(1-eps, 1+eps), in training mode only. Only the
      router sees the noise (Mixtral's own `router_jitter_noise` perturbs the experts' input too).
    * `moe.router_fp32`: router weights are cast to fp32 and the router runs in fp32 with autocast off.
    * `moe.expert_dropout`: dropout on the routed experts' hidden activations (after act(gate) * up, before
      down_proj), in training mode only. Works with every experts kernel (eager, grouped_mm, batched_mm) and with
      4-bit parametrized experts.

    Args:
        model: a transformers MoE model, possibly PEFT-wrapped or 4-bit.
        moe: the recipe's `moe` section.

    Returns:
        A handle whose `remove()` takes every control off again (fp32 weights are cast back).

    Raises:
        MoetuneError: expert dropout was asked for on experts whose activation moetune cannot find.
    """
    previous = getattr(model, _ATTR, None)
    if previous is not None:
        previous.remove()
    controls = RouterControls()
    for layer in find_moe_layers(model):
        if moe.router_fp32:
            _router_to_fp32(layer.router, controls)
        if moe.router_fp32 or moe.router_jitter > 0:
            logits_index = router_output_index(model, innermost_module(layer.router))
            # transformers' fused experts kernels take fp32 routing weights and cast their result back themselves
            fused = hasattr(innermost_module(layer.experts), "is_concatenated")
            _wrap_router_forward(layer.router, moe.router_jitter, moe.router_fp32, logits_index, fused, controls)
        if moe.expert_dropout > 0:
            _add_expert_dropout(layer.experts, moe.expert_dropout, controls)
    object.__setattr__(model, _ATTR, controls)  # a plain attribute: not a submodule, not in the state dict
    controls._add(lambda: object.__setattr__(model, _ATTR, None))
    return controls


def _router_to_fp32(router: nn.Module, controls: RouterControls) -> None:
    for param in router.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            original = param.dtype
            # Keep the Parameter object (an optimizer may already hold it); only its storage changes dtype.
            param.data = param.data.float()
            controls._add(lambda p=param, dtype=original: setattr(p, "data", p.data.to(dtype)))


def _wrap_router_forward(router: nn.Module, jitter: float, fp32: bool, logits_index: int, fused: bool,
                         controls: RouterControls) -> None:
    # An instance-level forward, not a pre-hook: a hook cannot switch autocast off around the router's matmul,
    # and under bf16 autocast F.linear would run in bf16 even with fp32 inputs. A bound method, not a closure over
    # `router`: PEFT's modules_to_save deep-copies the router, and a copied bound method is rebound to the copy,
    # whereas a closure would keep running the original router and the trained copy would get no gradient.
    original = router.forward

    def forward(self, hidden_states, *args, **kwargs):
        run = original if self is router else functools.partial(type(self).forward, self)
        if jitter > 0 and self.training:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
            hidden_states = hidden_states * noise  # out of place: the experts must not see the noise
        if not fp32:
            return run(hidden_states, *args, **kwargs)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            output = run(hidden_states.float(), *args, **kwargs)
        if fused and isinstance(output, tuple):
            return output
        # Unfused families (dbrx, llama4, jetmoe) feed the routing weights, or dbrx the logits themselves, straight
        # into matmuls with the activations: round them back to the activations' dtype once, after the fp32 math.
        # Elsewhere the logits stay fp32 for the aux and z losses.
        if not isinstance(output, tuple):
            return output.to(hidden_states.dtype)
        return tuple(
            item.to(hidden_states.dtype) if i != logits_index and isinstance(item, torch.Tensor) and item.is_floating_point()
            else item for i, item in enumerate(output)
        )

    router.forward = types.MethodType(forward, router)
    controls._add(lambda: delattr(router, "forward"))


def _add_expert_dropout(experts: nn.Module, p: float, controls: RouterControls) -> None:
    experts = innermost_module(experts)
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and gate is not _default_apply_gate:
        # gpt-oss style: the family's own `_apply_gate` (used by the eager forward and by transformers' grouped_mm /
        # batched_mm kernels alike) computes the gated activation without an act_fn module; wrap its result.
        original = experts._apply_gate

        def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
            return _dropout(original(gate_up), p, experts.training)

        experts._apply_gate = apply_gate
        controls._add(lambda: delattr(experts, "_apply_gate"))
        return
    # The activation sits on the experts module (fused families) or one level down (dbrx's experts.mlp).
    activation = next((module for name, module in experts.named_modules()
                       if name.rsplit(".", 1)[-1] in _ACTIVATION_ATTRS and name.count(".") <= 1), None)
    if activation is None:
        raise MoetuneError(
            f"`moe.expert_dropout` is {p} but {type(experts).__name__} has no activation module "
            f"({'/'.join(_ACTIVATION_ATTRS)}) to put the dropout after; set `moe.expert_dropout: 0.0` for this model"
        )

    # Dropout on act(gate) before the `* up` product equals dropout on act(gate) * up (one elementwise mask,
    # the same 1/(1-p) scale), and the activation module is what both the eager forward and transformers'
    # default `_apply_gate` (grouped_mm / batched_mm kernels) call, so one hook covers every kernel.
    def hook(module, args, output):
        return _dropout(output, p, experts.training)

    controls._add(activation.register_forward_hook(hook))


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: `F.dropout` on an accelerator, `moetune.dropout_masks` on CPU (where `F.dropout`'s
    per-element `bernoulli_` cost more than the rest of moetune's additions together: docs/benchmarks.md)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p=p, training=True)
    return dropout_masks.dropout(x, p)
