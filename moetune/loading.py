"""Load an MoE causal LM the MoE-aware way: dtype, experts kernel, fp32 router, and real 4-bit (QLoRA).

`load_model(recipe.model, recipe.quantization)` returns `(model, tokenizer)`. In 4-bit mode the attention,
shared-expert, dense-MLP *and* fused routed-expert weights are quantized while the checkpoint streams in
(`moetune.quantization.MoEBnb4BitHfQuantizer`); the router, embeddings and lm_head are not.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from moetune._compat import keep_bnb_weights_trainable
from moetune.config import ModelSection, MoESection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.router_controls import apply_router_controls


logger = logging.getLogger(__name__)


def read_config(name_or_path: str, *, trust_remote_code: bool = False):
    """The model's config from a local directory or the Hub, with user mistakes turned into one-line errors."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoetuneError(f"{name_or_path} is a file; give the model directory that holds config.json")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MoetuneError(f"{name_or_path} has no config.json: not a Hugging Face model directory")
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoetuneError(f"{config_file} is not valid JSON: {err}") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise MoetuneError(f"{config_file} has no `model_type`, so the architecture is unknown")
    elif _looks_like_path(name_or_path):
        raise MoetuneError(f"no such model directory: {name_or_path}")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        where = str(path) if path.exists() else f"the Hub id {name_or_path!r}"
        raise MoetuneError(f"cannot read the config of {where}: {str(err).splitlines()[0]}") from None


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a separator is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _experts_implementation(section: ModelSection, config: PretrainedConfig) -> str | None:
    """The kernel to request; None lets transformers pick (grouped_mm where the family supports it, else eager)."""
    if section.experts_implementation is not None:
        return section.experts_implementation
    # grouped_mm on CPU needs 16-byte-aligned strides (STACK.md §2); fall back to eager where the shapes break it.
    text = config.get_text_config(decoder=True)
    dims = [getattr(text, key, None) for key in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    multiple = 16 // getattr(torch, section.dtype).itemsize
    if not torch.cuda.is_available() and any(isinstance(d, int) and d % multiple for d in dims):
        return "eager"
    return None


def load_model(
    model: ModelSection | str,
    quantization: QuantizationSection | None = None,
    *,
    router_fp32: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an MoE causal LM and its tokenizer.

    Args:
        model: the recipe's `model` section, or just a path / Hub id (other fields at their defaults).
        quantization: the recipe's `quantization` section; None loads in `model.dtype` without quantization.
        router_fp32: keep router weights and logits in fp32.

    Returns:
        `(model, tokenizer)`. A 4-bit model has `is_loaded_in_4bit` set and every expert weight in 4-bit.

    Raises:
        MoetuneError: a missing path, a directory that is not a model, an experts kernel the family does not
            support, or (4-bit) an expert weight that stayed unquantized.
    """
    section = ModelSection(name_or_path=model) if isinstance(model, str) else model
    try:
        config = read_config(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except MoetuneError as err:
        raise MoetuneError(f"model.name_or_path: {err}") from None
    dtype = getattr(torch, section.dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": section.trust_remote_code}
    impl = _experts_implementation(section, config)
    if impl is not None:
        kwargs["experts_implementation"] = impl
    if quantization is not None:
        from moetune.quantization import quantize_config

        kwargs["quantization_config"] = quantize_config(quantization, dtype, router_fp32=router_fp32)
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(section.name_or_path, config=config, **kwargs)
    except ValueError as err:
        if re.search(r"experts.implementation", str(err)):
            raise MoetuneError(f"model.experts_implementation={impl!r} is not supported by "
                               f"{config.model_type}: {err}") from err
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as err:
        raise MoetuneError(f"cannot load a tokenizer from model.name_or_path {section.name_or_path!r}: {err}") from err

    if router_fp32:
        # fp32 router weights and fp32 routing math; the recipe runner re-applies controls with its `moe` section.
        apply_router_controls(loaded, MoESection(router_fp32=True))
    if quantization is not None:
        from moetune.quantization import check_experts_quantized

        report = check_experts_quantized(loaded)
        logger.info("4-bit resident bytes by group: %s",
                    dict(sorted(report.items())))
        keep_bnb_weights_trainable(loaded)
    return loaded, tokenizer


def empty_model(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's architecture without its weights, on the meta device: parameter names and shapes (and the
    layout PEFT gives an adapter on it) at no memory and no download beyond config.json.

    Raises:
        MoetuneError: as `read_config`.
    """
    config = read_config(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
