"""The one place where moetune works around upstream bugs. Each fix is version-gated, scoped and tested.

Both fixes act on the *instances* of one model (never on a library class), so nothing changes for other
models in the same process, and both are no-ops once the upstream versions that need them are gone.

1. PEFT < 0.22: `ParamWrapper` (LoRA via `target_parameters`) on a parameter that is already parametrized,
   which is what a 4-bit bitsandbytes expert weight is (`bitsandbytes.nn.parametrize`), has two silent bugs
   (measured on peft 0.21.2, docs/upstream.md#peft-param-wrapper):
   a. `_remove_parametrizations` only removes a `_LoraParameterProxy`. A single adapter on a 3-D expert weight
      uses a `_LoraFactorsProxy`, which is never removed, so proxies pile up: the LoRA delta is applied once
      more on every forward and memory grows.
   b. With two targeted parameters on one module (gate_up_proj and down_proj), the inner wrapper's
      `get_param()` runs inside the outer wrapper's `parametrize.cached()` and caches the weight *before* its
      own LoRA proxy is registered, so the inner LoRA has no effect and gets no gradient.
   `fix_peft_param_wrappers(model)` gives each affected `ParamWrapper` fixed versions of those two methods.
   Upstream code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py
   (`ParamWrapper._activate_lora` / `_remove_parametrizations`).

2. bitsandbytes <= 0.50.x on CPUs with AVX512-BF16: `Linear4bit.forward` in eval mode without grad repacks
   its weight into a CPU inference layout (`_convert_weight_packed_for_cpu`). The inverse, run by
   `state_dict()`, leaves absmax transposed in bf16 when double quantization is off, so saving corrupts
   weights; and after the repack QLoRA training on CPU silently stops learning (docs/upstream.md#bnb-cpu-repack).
   The recipe runner evaluates before training, which takes that path.
   `keep_bnb_weights_trainable(model)` turns the repack off on the model's Linear4bit modules and undoes a
   repack that already happened. Call it once after loading (`load_model` already does).
   Upstream code: https://github.com/bitsandbytes-foundation/bitsandbytes/blob/0.50.2/bitsandbytes/nn/modules.py
   (`Linear4bit.forward`) and `functional._convert_weight_packed_for_cpu_inverse`.
"""

import types
from contextlib import contextmanager

import torch
from packaging.version import Version
from torch import nn
from torch.nn.utils import parametrize


def peft_param_wrapper_fix_needed() -> bool:
    """True while the installed PEFT has the two ParamWrapper bugs (fixed versions are expected from 0.22)."""
    import peft

    return Version(peft.__version__) < Version("0.22")


def bnb_cpu_repack_fix_needed() -> bool:
    """True while the installed bitsandbytes has the CPU Linear4bit repack bug (seen up to 0.50.2)."""
    import bitsandbytes

    return Version(bitsandbytes.__version__) < Version("0.51")


def _lora_proxy_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    return (layer._LoraParameterProxy, layer._LoraFactorsProxy)


def _remove_parametrizations(self) -> None:
    # Same as PEFT's, but removes either proxy type (bug a), and drops the cached value of this parameter so
    # the next reader sees the weight without this LoRA.
    base_layer = self.get_base_layer()
    name = self.parameter_name
    param_list = base_layer.parametrizations[name]
    if len(param_list) == 1:
        parametrize.remove_parametrizations(base_layer, name, leave_parametrized=False)
    else:
        proxies = _lora_proxy_types()
        for i in reversed(range(len(param_list))):
            if isinstance(param_list[i], proxies):
                del param_list[i]
                break
        else:
            raise RuntimeError(f"no LoRA parametrization found on {name!r} of {type(base_layer).__name__}")
    parametrize._cache.pop((id(base_layer), name), None)


@contextmanager
def _activate_lora(self, active_adapters: list[str]):
    # PEFT's context registers the LoRA proxy, enters `parametrize.cached()` and yields. A value of this
    # parameter cached before the proxy existed (by an outer wrapper's cache, bug b) is stale: drop it.
    with type(self)._activate_lora(self, active_adapters):
        parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
        yield


def fix_peft_param_wrappers(model: nn.Module) -> int:
    """Fix the two PEFT < 0.22 ParamWrapper bugs on this model's wrappers of parametrized (4-bit) weights.

    Idempotent; call it after every `get_peft_model` / `PeftModel.from_pretrained` on a 4-bit model
    (`moetune.adapters` does). A no-op on fixed PEFT versions and on wrappers of plain parameters.

    Args:
        model: a PEFT-wrapped model.

    Returns:
        The number of wrappers fixed now.
    """
    if not peft_param_wrapper_fix_needed():
        return 0
    from peft.tuners.lora.layer import ParamWrapper

    fixed = 0
    for module in model.modules():
        if not isinstance(module, ParamWrapper) or "_activate_lora" in module.__dict__:
            continue
        if not parametrize.is_parametrized(module.get_base_layer(), module.parameter_name):
            continue  # unquantized weights are not affected (docs/upstream.md#peft-param-wrapper)
        # Instance attributes shadow the class methods for this wrapper only.
        module._activate_lora = types.MethodType(_activate_lora, module)
        module._remove_parametrizations = types.MethodType(_remove_parametrizations, module)
        fixed += 1
    return fixed


def _unpack_cpu_layout(weight) -> None:
    # Inverse of bitsandbytes' `_convert_weight_packed_for_cpu`. Its own inverse restores absmax only for
    # nested (double-quant) states; for the plain case absmax stays transposed bf16 [K/64, N] (the bug).
    from bitsandbytes import functional as F

    state = weight.quant_state
    nested = state.original_nested
    if not nested:
        # Undo the transpose + bf16 cast ourselves; bitsandbytes' inverse then only repacks the weight.
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    weight.data, weight.quant_state = F._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        weight.quant_state.dtype = state.original_dtype


def keep_bnb_weights_trainable(model: nn.Module) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` out of the CPU inference repack (bitsandbytes <= 0.50).

    Call once after loading, before any evaluation or generation: afterwards eval-mode forwards, `state_dict()`
    and adapter saving leave the 4-bit weights intact and QLoRA keeps training. Costs only the CPU-specific
    inference fast path. Idempotent; a no-op on fixed bitsandbytes versions.

    Args:
        model: any model, PEFT-wrapped or not.

    Returns:
        The number of Linear4bit modules changed now.
    """
    if not bnb_cpu_repack_fix_needed():
        return 0
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _unpack_cpu_layout(module.weight)
        if module.support_avx512bf16_for_cpu:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
