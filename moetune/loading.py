"""Load an MoE causal LM the MoE-aware way: dtype, experts kernel, fp32 router, and real 4-bit (QLoRA).

`load_model(recipe.model, recipe.quantization)` returns `(model, tokenizer)`. In 4-bit mode the attention,
shared-expert, dense-MLP *and* fused routed-expert weights are quantized while the checkpoint streams in
(`moetune.quantization.MoEBnb4BitHfQuantizer`); the router, embeddings and lm_head are not.
"""

import json
import logging
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from moetune._compat import keep_bnb_weights_trainable
from moetune.config import ModelSection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.rules import is_local_model_path
from moetune.textfiles import NotUtf8Text, decode_utf8


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
            raw = json.loads(decode_utf8(config_file.read_bytes()))
        except (json.JSONDecodeError, NotUtf8Text) as err:
            raise MoetuneError(f"{config_file} is not valid JSON: {err}") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise MoetuneError(f"{config_file} has no `model_type`, so the architecture is unknown")
        _check_sizes(raw, config_file)
    elif is_local_model_path(name_or_path):
        raise MoetuneError(f"no such model directory: {name_or_path}")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, trust_remote_code=trust_remote_code)
    except StrictDataclassError as err:
        # transformers v5 configs are strict dataclasses (not a ValueError): the last line names the field, the
        # expected type and the value ("TypeError: Field 'hidden_size' expected int, got NoneType (value: None)").
        where = str(path / "config.json") if path.exists() else f"the config of Hub id {name_or_path!r}"
        cause = str(err).splitlines()[-1].strip()
        raise MoetuneError(f"{where}: {re.sub(r'^[A-Za-z]+Error: ', '', cause)}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        where = str(path) if path.exists() else f"the Hub id {name_or_path!r}"
        raise MoetuneError(f"cannot read the config of {where}: {str(err).splitlines()[0]}") from None


# Sizes that every model needs positive; transformers accepts 0 or -1 here and fails later, deep in model code
# (ZeroDivisionError, "negative dimension"). Counts that may be 0 (shared experts, dense layers) are not listed.
_POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok",
                   "num_local_experts", "num_experts", "n_routed_experts")


def _check_sizes(raw: dict, config_file: Path) -> None:
    for section in (raw, raw.get("text_config")):
        for key in _POSITIVE_SIZES if isinstance(section, dict) else ():
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise MoetuneError(f"{config_file}: `{key}` must be a positive integer, got {value}")


def _check_weight_files(path: Path) -> None:
    """Fail before loading anything when a local checkpoint's safetensors files are missing or cut short.

    safetensors' own error ("incomplete metadata, file not fully covered") does not say which file it means.
    Same order as transformers: a single model.safetensors wins over an index.
    """
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise MoetuneError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise MoetuneError(f"{index} names {len(missing)} shard file{'s' if len(missing) > 1 else ''} that "
                               f"{'are' if len(missing) > 1 else 'is'} missing: {', '.join(missing[:3])}")
        files = [path / name for name in shards]
    else:
        files = []  # .bin or no weights at all: transformers' own OSError names the folder
    for file in files:
        _check_safetensors_size(file)


def _check_safetensors_size(file: Path) -> None:
    """The file must be exactly 8 + header length + the end of its last tensor, as safetensors requires."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise MoetuneError(f"{file} is truncated or not a safetensors file ({size} bytes); re-download or re-save it")
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise MoetuneError(f"{file} is not a safetensors file (unreadable header); re-download or re-save it") from None
    expected = 8 + header_len + end
    if size != expected:
        raise MoetuneError(f"{file} is truncated or damaged: {size} bytes, but its header describes {expected}; "
                           "re-download or re-save it")


# Files a tokenizer is loaded from (fast, sentencepiece, BPE vocab, Mistral's tekken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def _load_tokenizer(section: ModelSection) -> PreTrainedTokenizerBase:
    path = Path(section.name_or_path).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise MoetuneError(f"model.name_or_path: {section.name_or_path} has no tokenizer (none of "
                           f"{', '.join(_TOKENIZER_FILES[:3])}, ...): copy the tokenizer files of the base model into it")
    try:
        return AutoTokenizer.from_pretrained(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]  # transformers' messages span several lines
        raise MoetuneError(f"model.name_or_path: cannot load a tokenizer from {section.name_or_path!r}: {reason}") from err


def _experts_implementation(section: ModelSection, config: PretrainedConfig) -> str | None:
    """The kernel to request; None lets transformers pick (grouped_mm where the family supports it, else eager)."""
    if section.experts_implementation is not None:
        return section.experts_implementation
    # grouped_mm on CPU needs 16-byte-aligned strides (docs/upstream.md#grouped-mm-on-cpu): else fall back to eager.
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
    router_fp32: bool = False,
    with_tokenizer: bool = True,
    distributed_config=None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load an MoE causal LM and its tokenizer.

    Args:
        model: the recipe's `model` section, or just a path / Hub id (other fields at their defaults).
        quantization: the recipe's `quantization` section; None loads in `model.dtype` without quantization.
        router_fp32: (4-bit) load the router weights in fp32 (the model then needs `MoETrainer` or
            `apply_router_controls` to run its router in fp32). Training controls (fp32 routing math, jitter,
            expert dropout) are not installed here: `MoETrainer` installs them once, on the modules that train.
        with_tokenizer: False for weights-only use (`moetune inspect --quantize`): no tokenizer needed, None returned.
        distributed_config: a transformers `DistributedConfig` (expert parallelism, `moetune.expert_parallel`):
            the weights are sharded across the ranks while they load.

    Returns:
        `(model, tokenizer)`. A 4-bit model has `is_loaded_in_4bit` set and every expert weight in 4-bit.

    Raises:
        MoetuneError: a missing path, a directory that is not a model, a bad config.json, missing or truncated
            weight files, no tokenizer (checked before any weight is read), an experts kernel the family does not
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
    if distributed_config is not None:
        kwargs["distributed_config"] = distributed_config
    if quantization is not None:
        from moetune.quantization import quantize_config

        kwargs["quantization_config"] = quantize_config(quantization, dtype, router_fp32=router_fp32)
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    # The tokenizer first: it loads in a moment, and a folder without one should fail before gigabytes of weights.
    tokenizer = _load_tokenizer(section) if with_tokenizer else None
    local = Path(section.name_or_path).expanduser()
    if local.is_dir():
        try:
            _check_weight_files(local)
        except MoetuneError as err:
            raise MoetuneError(f"model.name_or_path: {err}") from None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(section.name_or_path, config=config, **kwargs)
    except ValueError as err:
        if re.search(r"experts.implementation", str(err)):
            raise MoetuneError(f"model.experts_implementation={impl!r} is not supported by "
                               f"{config.model_type}: {err}") from err
        raise
    except (SafetensorError, OSError) as err:
        # What the checks above cannot see: no weight file at all, a Hub id offline, a damaged tensor inside a file.
        raise MoetuneError(f"model.name_or_path: cannot load the weights of {section.name_or_path!r}: "
                           f"{str(err).strip().splitlines()[0]}") from err

    if quantization is not None:
        from moetune.quantization import check_experts_quantized

        report = check_experts_quantized(loaded)
        logger.info("4-bit model in memory: %s MB (%s)", _mb(sum(report.values())),
                    ", ".join(f"{group} {_mb(size)}" for group, size in sorted(report.items(), key=lambda kv: -kv[1])))
        keep_bnb_weights_trainable(loaded)
    return loaded, tokenizer


def load_tokenizer(model: ModelSection | str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory or Hub id, without loading any weights."""
    return _load_tokenizer(ModelSection(name_or_path=model) if isinstance(model, str) else model)


def empty_model(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's architecture without its weights, on the meta device: parameter names and shapes (and the
    layout PEFT gives an adapter on it) at no memory and no download beyond config.json.

    Raises:
        MoetuneError: as `read_config`.
    """
    from moetune.deepspeed_setup import zero3_init_off

    config = read_config(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"), zero3_init_off():  # on one rank, inside a ZeRO-3 run: no partitioning collectives
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f}" if size >= 2**20 / 20 else "<0.1"
