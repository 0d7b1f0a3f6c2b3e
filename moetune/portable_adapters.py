"""Portable adapters: a saved LoRA adapter rewritten so that plain PEFT loads it onto a full-precision base from
any working directory, and the parameters an adapter directory holds, per group (read without the weights)."""

import json
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights

from moetune.adapters import match_nesting  # the key renaming `load_adapter` does too
from moetune.architectures import ADAPTER_GROUP, canonical_name, classify_parameters
from moetune.errors import MoetuneError
from moetune.run_info import ADAPTER_CONFIG


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def resolve_base(name_or_path: str) -> str:
    """A local model directory as an absolute path (so the adapter loads from any working directory); a Hub id
    as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _peft_skeleton(adapter_dir: Path, base: str, trust_remote_code: bool) -> PeftModel:
    """The adapter's LoRA layout on an unquantized base, built on the meta device (no weights are read)."""
    from moetune.loading import empty_model

    with warnings.catch_warnings():  # "base_model_name_or_path was renamed": the skeleton's path is the resolved one
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.* was renamed")
        return get_peft_model(empty_model(base, trust_remote_code=trust_remote_code),
                              LoraConfig.from_pretrained(str(adapter_dir)))


def _adapter_base(adapter_dir: Path, base_name_or_path: str | None) -> tuple[dict, str]:
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        raise MoetuneError(f"{str(adapter_dir)!r} is not an adapter directory: it has no {ADAPTER_CONFIG}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = base_name_or_path or config.get("base_model_name_or_path")
    if not base:
        raise MoetuneError(f"{config_file} names no base model; pass the base model explicitly")
    return config, base


def make_adapter_portable(adapter_dir: str | Path, base_name_or_path: str | None = None, *,
                          trust_remote_code: bool = False) -> Path:
    """Rewrite a saved adapter so that plain `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM` load it onto
    a full-precision base, from any working directory. Idempotent; `load_adapter` reads both layouts.

    Two things stop a saved adapter from loading elsewhere:
      * PEFT names the LoRA weights of a module with several targeted parameters (fused experts: gate_up_proj
        and down_proj) by wrapper depth, and nests the wrappers in another order when the parameters are 4-bit
        (parametrized) than when they are plain. An adapter trained on a 4-bit base then fails on a plain one
        with "size mismatch for ...experts.base_layer.lora_A". The keys are renamed to the nesting an
        unquantized base gets, read from PEFT itself on a weightless (meta-device) copy of the base.
      * `base_model_name_or_path` is whatever path training was given, often relative. A local directory is
        stored absolute; a Hub id stays as it is.

    Args:
        adapter_dir: a directory written by `PeftModel.save_pretrained` (a LoRA run's output dir).
        base_name_or_path: the base model; None takes the adapter config's `base_model_name_or_path`, read
            relative to the current directory.
        trust_remote_code: allow model code from the Hub repo of the base.

    Returns:
        The adapter directory.

    Raises:
        MoetuneError: no adapter in the directory, an unreadable base, or weights that do not fit the base.
    """
    path = Path(adapter_dir)
    config, base = _adapter_base(path, base_name_or_path)
    weights_file = next((path / name for name in _WEIGHT_FILES if (path / name).is_file()), None)
    if weights_file is None:
        raise MoetuneError(f"{str(adapter_dir)!r} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(_WEIGHT_FILES)})")
    base = resolve_base(base)
    expected = get_peft_model_state_dict(_peft_skeleton(path, base, trust_remote_code))
    saved = load_peft_weights(str(path), device="cpu")
    renamed = match_nesting(saved, expected)
    wrong = [k for k in renamed if k in expected and renamed[k].shape != expected[k].shape]
    if set(renamed) != set(expected) or wrong:
        missing, extra = sorted(set(expected) - set(renamed)), sorted(set(renamed) - set(expected))
        raise MoetuneError(f"adapter {str(adapter_dir)!r} does not fit the base {base!r}: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}, wrong shape {wrong[:3]}")
    if any(renamed[key] is not value for key, value in saved.items()):  # levels were swapped
        safetensors = weights_file.suffix == ".safetensors"
        _replace_file(weights_file, lambda tmp: _save_weights(renamed, tmp, safetensors=safetensors))
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        text = json.dumps(config, indent=2, sort_keys=True)  # as PEFT writes it
        _replace_file(path / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _save_weights(state: dict[str, torch.Tensor], file: Path, *, safetensors: bool) -> None:
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    else:
        torch.save(state, file)


def _replace_file(target: Path, write) -> None:
    # Write beside the target and rename over it: an interrupted rewrite never leaves a half-written adapter.
    tmp = target.with_name(target.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def adapter_parameter_counts(adapter_dir: str | Path, base_name_or_path: str | None = None, *,
                             trust_remote_code: bool = False) -> dict[str, dict[str, int]]:
    """Trainable parameters an adapter holds, per parameter group: `{group: {"lora": n, "full": m}}`.

    "lora" counts LoRA factors by the group of the module they adapt; "full" counts modules trained in full and
    saved with the adapter (PEFT `modules_to_save`). Only non-zero entries appear. Reads no weights.

    Raises:
        MoetuneError: as `make_adapter_portable`.
    """
    path = Path(adapter_dir)
    _, base = _adapter_base(path, base_name_or_path)
    model = _peft_skeleton(path, resolve_base(base), trust_remote_code)
    groups = classify_parameters(model)
    module_group = {}
    for name, group in groups.items():
        if group != ADAPTER_GROUP:
            module_group.setdefault(canonical_name(name).rpartition(".")[0], group)
    counts: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        if groups[name] == ADAPTER_GROUP:
            group, kind = module_group.get(canonical_name(name.split(".lora_")[0]), "other"), "lora"
        elif ".modules_to_save." in name:
            group, kind = groups[name], "full"
        else:
            continue
        entry = counts.setdefault(group, {})
        entry[kind] = entry.get(kind, 0) + param.numel()
    return counts
