"""4-bit (QLoRA) quantization that covers the fused MoE experts, and a measured resident-bytes report.

transformers' bitsandbytes integration quantizes only `nn.Linear` modules, so the fused 3-D expert weights
(about 95% of a Mixtral) stay in bf16 (bitsandbytes#1849, docs/upstream.md#bnb-fused-experts).
`MoEBnb4BitHfQuantizer` is the stock `Bnb4BitHfQuantizer` plus one thing: it also claims the expert weights of
every MoE layer. transformers' loader fuses the per-expert checkpoint tensors of one layer (its own
`conversion_mapping`), hands the fused tensor to our quantize op, and we turn it into a bitsandbytes 4-bit
parametrization right there (`bitsandbytes.nn.parametrize.replace_parameter_4bit`). So only one layer's experts are ever held in full
precision, and the whole model never is.

It plugs in through transformers' public `register_quantizer` hook under its own method name, so the stock
bitsandbytes path is untouched for everyone else.
"""

import ctypes
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.utils.quantization_config import QuantizationMethod

from moetune.config import QuantizationSection
from moetune.errors import MoetuneError
from moetune.rules import is_expert_weight


QUANT_METHOD = "moetune_bnb_4bit"
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size, the same as Linear4bit uses
QUANTIZE_SLICE = 1 << 20  # elements per bitsandbytes call while loading; a multiple of BLOCKSIZE


class MoEBitsAndBytesConfig(BitsAndBytesConfig):
    """A `BitsAndBytesConfig` (4-bit) whose quantizer also quantizes the fused MoE experts."""

    def __init__(self, *args: Any, router_fp32: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.router_fp32 = router_fp32
        # Selects MoEBnb4BitHfQuantizer in AutoHfQuantizer; reset to plain bitsandbytes after loading.
        self.quant_method = QUANT_METHOD

    def to_plain(self) -> BitsAndBytesConfig:
        """The same settings as a stock `BitsAndBytesConfig`, for the loaded model's config."""
        keys = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                "bnb_4bit_quant_storage", "llm_int8_skip_modules")
        return BitsAndBytesConfig(**{k: getattr(self, k) for k in keys})


def quantize_config(quantization: QuantizationSection, compute_dtype: torch.dtype, *,
                    router_fp32: bool = True) -> MoEBitsAndBytesConfig:
    """The transformers quantization config for a recipe's `quantization` section.

    Args:
        quantization: the recipe section (nf4/fp4, double quantization).
        compute_dtype: dtype 4-bit weights are dequantized to (the model's dtype).
        router_fp32: load the router weights in fp32.

    Returns:
        A config to pass as `from_pretrained(..., quantization_config=...)`.
    """
    return MoEBitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        router_fp32=router_fp32,
    )


def _is_expert_weight(name: str, param: torch.Tensor, router_name: str = "") -> bool:
    # >=2-D weights: 3-D fused stacks, dbrx's 2-D [E*F, H] stacks. gpt_oss' [E, 2I] biases stay unquantized.
    return param.dim() >= 2 and is_expert_weight(name, router_name)


def quantize_4bit_chunked(tensor: torch.Tensor, quant_type: str, double_quant: bool) -> tuple[torch.Tensor, Any]:
    """`bitsandbytes.functional.quantize_4bit(tensor, blocksize=64, ...)`, a slice of 2^20 elements at a time.

    bitsandbytes' CPU kernel needs about 7x its input in temporaries (measured: 655 MB for a 92 MB bf16
    [8, 5632, 1024] stack), which would dominate peak memory while loading. bitsandbytes quantizes the flattened
    tensor in 64-element blocks, so slices whose length is a multiple of 64 give the same bytes; the double
    quantization of absmax then runs once over all of them, exactly as bitsandbytes does it
    (`functional.quantize_4bit`, 0.50.2). Slices of fixed size (not per expert) keep the temporaries at ~30 MB
    whatever the expert size (per-expert slices left a 0.5 GB transient at Mixtral proportions).

    Returns:
        The packed uint8 data `[numel / 2, 1]` and its `QuantState`, as `quantize_4bit` returns them.
    """
    from bitsandbytes import functional as F

    if tensor.numel() <= QUANTIZE_SLICE:
        return F.quantize_4bit(tensor, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type)
    flat = tensor.reshape(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), QUANTIZE_SLICE):
        out, chunk_absmax = torch.ops.bitsandbytes.quantize_4bit.default(
            flat[start:start + QUANTIZE_SLICE], BLOCKSIZE, quant_type, torch.uint8)
        packed.append(out)
        absmax.append(chunk_absmax)
    packed, absmax = torch.cat(packed), torch.cat(absmax)
    common = dict(shape=tensor.shape, dtype=tensor.dtype, blocksize=BLOCKSIZE, quant_type=quant_type,
                  code=F.get_4bit_type(quant_type, device=tensor.device))
    if not double_quant:
        return packed, F.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, F.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _release_freed_memory() -> None:
    # glibc keeps freed mid-sized blocks (a layer's per-expert tensors, bitsandbytes' temporaries) in its heap,
    # so RSS keeps growing by about a layer's worth of fragments; hand them back after each quantized weight.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _QuantizeOp(ConversionOps):
    """Quantizes one loaded tensor: expert weights into a 4-bit parametrization, the rest as Linear4bit."""

    def __init__(self, hf_quantizer: "MoEBnb4BitHfQuantizer"):
        from transformers.integrations.bitsandbytes import Bnb4bitQuantize

        self.hf_quantizer = hf_quantizer
        self._linear = Bnb4bitQuantize(hf_quantizer)

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit_prequantized

        from moetune.quantized_experts import use_flat_decoding

        config = self.hf_quantizer.quantization_config
        linear = {}
        for name, value in input_dict.items():
            if name not in self.hf_quantizer.expert_params:
                linear[name] = value
                continue
            value = value[0] if isinstance(value, list) else value
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path)
            # The fused full-precision tensor of this one layer lives only until it is quantized here.
            packed, state = quantize_4bit_chunked(value, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant)
            setattr(module, attr, nn.Parameter(packed, requires_grad=False))
            replace_parameter_4bit_prequantized(module, attr, state.as_dict(packed=True), packed.device)
            use_flat_decoding(module.parametrizations[attr][0])  # bitsandbytes' CPU decode is wrong for some widths
            module.parametrizations[attr].original._is_hf_initialized = True
            module._is_hf_initialized = True
            if missing_keys is not None:
                missing_keys.discard(name)
            _release_freed_memory()
        # Nothing left for the loader to assign for the expert weights: they are in place already.
        return self._linear.convert(linear, model=model, **kwargs) if linear else {}


class MoEBnb4BitHfQuantizer(Bnb4BitHfQuantizer):
    """bitsandbytes 4-bit for `nn.Linear` (as stock) plus the MoE expert weights; routers stay unquantized."""

    expert_params: set[str]

    def _process_model_before_weight_loading(self, model: nn.Module, device_map: Any, **kwargs: Any) -> None:
        from transformers.quantizers.base import get_keys_to_not_convert

        from moetune.architectures import find_moe_layers

        layers = find_moe_layers(model)
        # JetMoE's experts module is the whole block, router included: the router is never an expert weight.
        self.expert_params = {
            f"{layer.experts_name}.{name}" for layer in layers
            for name, param in layer.experts.named_parameters()
            if _is_expert_weight(f"{layer.experts_name}.{name}", param, layer.router_name)
        }
        routers = [layer.router_name for layer in layers if layer.router_name]
        # Some routers are plain nn.Linear (dbrx, jetmoe, hunyuan): keep them out of Linear4bit explicitly,
        # together with transformers' own defaults (lm_head).
        skip = set(self.quantization_config.llm_int8_skip_modules or []) | set(routers)
        skip |= set(get_keys_to_not_convert(model))
        self.quantization_config.llm_int8_skip_modules = sorted(skip)
        if getattr(self.quantization_config, "router_fp32", False):
            # Loaded straight into fp32 from the checkpoint: the loader keeps a param's own dtype.
            for layer in layers:
                if layer.router is not None:
                    layer.router.to(torch.float32)
        super()._process_model_before_weight_loading(model, device_map, **kwargs)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return param_name in self.expert_params or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOp(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        model = super()._process_model_after_weight_loading(model, **kwargs)
        from moetune.quantized_experts import install_quantized_forward

        # Dequantize only the routed experts, and again in backward rather than keeping them (issue 10, item 3).
        install_quantized_forward(model)
        # Downstream (Trainer, PEFT, TRL, `.to()` guards) must see an ordinary bitsandbytes model.
        model.quantization_method = QuantizationMethod.BITS_AND_BYTES
        return model

    def postprocess_model(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        model = super().postprocess_model(model, **kwargs)
        model.config.quantization_config = self.quantization_config.to_plain()
        return model


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(MoEBnb4BitHfQuantizer)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training`, made safe for 4-bit experts.

    PEFT casts every non-4-bit bf16/fp16 weight to fp32, so activations become fp32; the 4-bit experts would
    still dequantize to bf16 and the eager / batched_mm kernels then fail on the dtype mismatch
    (docs/upstream.md#kbit-training-order). The experts were quantized while loading, so they cannot be prepared first: instead their dequantization
    dtype is switched to fp32 as well. Use this instead of calling PEFT's function directly (optional: QLoRA
    also trains without it, in the model's dtype).

    Args:
        model: a model from `load_model(..., quantization)`.
        gradient_checkpointing: passed to PEFT as `use_gradient_checkpointing`.

    Returns:
        The same model.
    """
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for module in model.modules():
        if isinstance(module, Bnb4bitParametrization):
            module.quant_state.dtype = torch.float32
    return model


# ---------------------------------------------------------------------------------------------------------
# Measuring what is resident


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_states(model: nn.Module) -> dict[str, Any]:
    """Parameter name (as in `named_parameters`) -> bitsandbytes QuantState, for every 4-bit weight."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    states = {}
    for name, param in model.named_parameters():
        state = getattr(param, "quant_state", None)  # Linear4bit's Params4bit
        if state is not None:
            states[name] = state
    for module_name, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, Bnb4bitParametrization):
                    prefix = f"{module_name}." if module_name else ""
                    states[f"{prefix}parametrizations.{attr}.original"] = p.quant_state
    return states


def usage_by_group(model: nn.Module) -> dict[str, dict[str, int]]:
    """Measured bytes and parameter counts per parameter group, quantization state (absmax, quant_map, nested)
    included.

    Args:
        model: a loaded model (plain, PEFT-wrapped or 4-bit).

    Returns:
        `{group: {"params": logical parameter count, "resident_bytes": bytes}}`; buffers (rotary tables, score
        biases) are counted under "buffers".
    """
    from moetune.architectures import classify_parameters

    groups = classify_parameters(model)
    states = _quant_states(model)
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()

    def add(group: str, params: int, nbytes: int) -> None:
        entry = out.setdefault(group, {"params": 0, "resident_bytes": 0})
        entry["params"] += params
        entry["resident_bytes"] += nbytes

    for name, param in model.named_parameters():
        state = states.get(name)
        extra = 0
        if state is not None:
            for t in _quant_state_tensors(state):
                if t.data_ptr() not in seen:  # the nf4 code book can be shared
                    seen.add(t.data_ptr())
                    extra += _tensor_bytes(t)
        logical = int(torch.Size(state.shape).numel()) if state is not None else param.numel()
        add(groups.get(name, "other"), logical, _tensor_bytes(param) + extra)
    for _, buf in model.named_buffers():
        add("buffers", 0, _tensor_bytes(buf))
    return out


def resident_bytes_by_group(model: nn.Module) -> dict[str, int]:
    """Measured bytes held by each parameter group (quantization state included; buffers under "buffers").

    Args:
        model: a loaded model (plain, PEFT-wrapped or 4-bit).

    Returns:
        `{group: bytes}`.
    """
    return {group: entry["resident_bytes"] for group, entry in usage_by_group(model).items()}


def check_experts_quantized(model: nn.Module) -> dict[str, int]:
    """The load-time check of 4-bit mode: every expert weight must be 4-bit.

    Returns:
        The bytes per group, from `resident_bytes_by_group`.

    Raises:
        MoetuneError: naming the expert weights that are still in full precision.
    """
    from moetune.architectures import classify_parameters

    states = _quant_states(model)
    plain = [name for name, group in classify_parameters(model).items()
             if group == "experts" and name not in states and _is_expert_weight(name, model.get_parameter(name))]
    if plain:
        shown = ", ".join(plain[:4]) + (f" (and {len(plain) - 4} more)" if len(plain) > 4 else "")
        raise MoetuneError(f"4-bit loading left {len(plain)} expert weight(s) unquantized: {shown}. "
                           "Training this would not be QLoRA; please report the model type.")
    return resident_bytes_by_group(model)


def measure_quantized(name_or_path: str, quantization: QuantizationSection) -> dict[str, Any]:
    """Load a model the moetune 4-bit way and report what it really occupies (for `moetune inspect --quantize`).

    Args:
        name_or_path: local model directory or Hub id.
        quantization: the 4-bit settings.

    Returns:
        `{"resident_bytes": int, "bytes_per_param": float, "groups": {group: {"params", "resident_bytes"}}}`.
    """
    from moetune.loading import load_model

    model, _ = load_model(name_or_path, quantization, with_tokenizer=False, router_fp32=True)  # as training holds it
    groups = usage_by_group(model)
    total = sum(g["resident_bytes"] for g in groups.values())
    params = sum(g["params"] for g in groups.values())
    return {"resident_bytes": total, "bytes_per_param": total / max(params, 1), "groups": groups}
