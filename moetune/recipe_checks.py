"""Recipe checks beyond one field's type: files that must exist, `train` keys that must be trl.SFTConfig fields,
secrets, and rules between sections. They run on the raw mapping, so every problem is reported in one error
alongside pydantic's per-field ones. Nothing here imports torch, transformers or trl.
"""

import ast
import difflib
import functools
import importlib.util
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moetune.errors import RecipeError
from moetune.rules import (
    DATA_SUFFIXES,
    FREEZE_NAMES,
    LORA_GROUPS,
    expand_freeze_names,
    is_hub_id,
    is_local_data_source,
    is_local_model_path,
)


# SFTConfig fields that a recipe section already decides: setting them in `train` too would be ambiguous.
TRAIN_KEYS_OWNED = {
    "output_dir": "output.dir", "max_length": "data.max_length", "packing": "data.packing",
    "assistant_only_loss": "data.assistant_only_loss", "completion_only_loss": "data.assistant_only_loss",
    "push_to_hub": "output.push_to_hub", "hub_model_id": "output.hub_repo_id", "hub_private_repo": "output.private",
    "router_aux_loss_coef": "moe.aux_loss_coef", "model_init_kwargs": "the model section",
    "resume_from_checkpoint": "`moetune train --resume`", "overwrite_output_dir": "`moetune train --overwrite`",
}


def _sub(raw: dict, section: str) -> dict:
    value = raw.get(section)
    return value if isinstance(value, dict) else {}


def check_raw(raw: dict) -> list[str]:
    """Checks that pydantic's per-field validation cannot do: files, SFTConfig keys, cross-field rules."""
    problems = []
    data = _sub(raw, "data")
    for split in ("train", "eval"):
        if isinstance(data.get(split), str):
            problem = _check_data_source(f"data.{split}", data[split])
            if problem:
                problems.append(problem)
    model = _sub(raw, "model")
    name = model.get("name_or_path")
    if isinstance(name, str) and is_local_model_path(name) and not Path(name).expanduser().is_dir():
        problems.append(
            f"`model.name_or_path`: local model directory {name!r} not found (relative paths are read from the "
            f"current directory, {os.getcwd()})"
        )
    train = raw.get("train")
    if isinstance(train, dict):
        valid = sft_config_fields()
        problems += _check_train_values(train) + _check_train_types(train)
        for key in train:
            if _SECRET_KEY.search(str(key)):
                continue  # reported by _check_train_values, which never echoes the value
            if key in TRAIN_KEYS_OWNED:
                problems.append(f"`train.{key}`: set it with {TRAIN_KEYS_OWNED[key]} instead, moetune passes it to TRL")
            elif key not in valid:
                problems.append(f"unknown key `train.{key}`{did_you_mean(str(key), valid)}: `train` takes trl.SFTConfig fields")
    output = _sub(raw, "output")
    if output.get("push_to_hub") is True and not output.get("hub_repo_id"):
        problems.append("`output.hub_repo_id` is required when `output.push_to_hub` is true (e.g. your-name/mixtral-sft)")
    out_dir = output.get("dir")
    if isinstance(out_dir, str) and Path(out_dir).expanduser().is_file():
        problems.append(f"`output.dir`: {out_dir!r} is a file, not a directory")
    return problems


# `train` keys that hold credentials. TrainingArguments' only one is `hub_token` (`push_to_hub_token` is its
# removed predecessor); the rest catches secrets meant for other tools (report_to integrations).
_SECRET_KEY = re.compile(r"hub_token|access_token|auth_token|api_key|secret|password", re.IGNORECASE)


def _check_train_values(train: dict) -> list[str]:
    """Values of the free-form `train` section that pydantic cannot check: secrets and non-finite floats."""
    problems = []
    for key in train:
        if _SECRET_KEY.search(str(key)):
            instead = "set HF_TOKEN or run `hf auth login`" if "hub" in str(key).lower() else \
                "set it in the environment of the tool that reads it"
            problems.append(f"`train.{key}`: tokens never go in a recipe (they would be written to recipe.yaml and "
                            f"training_args.bin): {instead}")
    for key, value in _leaves(train, "train"):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"`{key}` must be a finite number, got {value!r}")
    return problems


def _leaves(node: Any, key: str) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every scalar in nested dicts and lists (`train.lr_scheduler_kwargs.min_lr`)."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{key}[{i}]")
    else:
        yield key, node


def _check_data_source(key: str, source: str) -> str | None:
    path = Path(source).expanduser()
    if not is_local_data_source(source):
        repo = source.split(":", 1)[0]
        if not is_hub_id(repo):
            return f"`{key}`: {source!r} is neither a local {'/'.join(DATA_SUFFIXES)} file nor a Hub dataset id (name, owner/name or owner/name:split)"
        return None
    if path.suffix.lower() not in DATA_SUFFIXES:
        return f"`{key}`: {source!r} has an unsupported file type; allowed: {', '.join(DATA_SUFFIXES)}"
    if not path.is_file():
        return f"`{key}`: data file {source!r} not found (relative paths are read from the current directory, {os.getcwd()})"
    return None


def check_cross(raw: dict) -> list[str]:
    """Rules between fields, run on the raw mapping so they are reported alongside per-field errors."""
    problems = []
    lora = raw.get("lora")
    if isinstance(lora, dict):
        targets = lora.get("targets", ["attention"])
        targets = [t for t in targets if isinstance(t, str)] if isinstance(targets, list) else []
        if ("experts" in targets and lora.get("dropout", 0) not in (0, 0.0, None)
                and lora.get("experts_path", "auto") != "split"):
            problems.append(
                f"`lora.dropout` must be 0 when `lora.targets` includes experts (got {lora['dropout']!r}), unless "
                "`lora.experts_path: split`: PEFT's ParamWrapper for 3-D expert weights has no dropout"
            )
        for target in targets:
            # A bare word is a group name; names with dots or underscores are explicit module/parameter names.
            if "." not in target and target not in LORA_GROUPS and did_you_mean(target, LORA_GROUPS):
                problems.append(
                    f"`lora.targets`: {target!r} is not a group{did_you_mean(target, LORA_GROUPS)}; "
                    f"groups: {', '.join(LORA_GROUPS)}"
                )
    freeze = _sub(raw, "freeze")
    names = freeze.get("train")
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and name not in FREEZE_NAMES:
            problems.append(
                f"`freeze.train`: unknown group or preset {name!r}{did_you_mean(name, FREEZE_NAMES)}; "
                f"allowed: {', '.join(FREEZE_NAMES)}"
            )
    if isinstance(lora, dict) and isinstance(names, list):
        # PEFT cannot both adapt a module and train it in full (modules_to_save), so say it before loading.
        trained = expand_freeze_names(n for n in names if isinstance(n, str))
        both = [t for t in targets if t in trained]
        if both:
            problems.append(
                f"`freeze.train` {names} trains {both} in full while `lora.targets` adapts {'it' if len(both) == 1 else 'them'}: "
                "PEFT cannot do both to one module; drop it from one of the two lists (e.g. `freeze.train: [router, norm]`)"
            )
    for key in ("include", "exclude"):
        patterns = freeze.get(key)
        for pattern in patterns if isinstance(patterns, list) else []:
            try:
                re.compile(str(pattern))
            except re.error as err:
                problems.append(f"`freeze.{key}`: {pattern!r} is not a valid regular expression ({err})")
    if isinstance(raw.get("experts"), dict) and isinstance(lora, dict):
        targets = lora.get("targets", ["attention"])
        if isinstance(targets, list) and "experts" not in targets:
            problems.append("`experts` with a `lora` section trains LoRA on the selected experts only, so "
                            f"`lora.targets` must include experts (got {targets}); or drop `lora` to train them in full")
    if raw.get("quantization") is not None and raw.get("lora") is None:
        problems.append("`quantization` needs a `lora` section: 4-bit weights cannot be trained or saved in full (QLoRA)")
    problems += _check_distributed(raw)
    train = raw.get("train")
    strategy = train.get("eval_strategy", "no") if isinstance(train, dict) else "no"
    if strategy != "no" and not _sub(raw, "data").get("eval"):
        problems.append(f"`train.eval_strategy` is {strategy!r} but `data.eval` is not set")
    return problems


# `train` keys that pick a distributed engine: `distributed.strategy` does that when it is not auto.
ENGINE_TRAIN_KEYS = ("fsdp", "fsdp_config", "deepspeed")


def _check_distributed(raw: dict) -> list[str]:
    strategy = _sub(raw, "distributed").get("strategy", "auto")
    if not isinstance(strategy, str):
        return []
    problems = _check_expert_parallel(raw, strategy)
    if strategy == "zero3" and raw.get("quantization") is not None:
        # ZeRO-3 builds the model under zero.Init, which transformers refuses with the device_map 4-bit loading
        # needs, and it would partition the packed 4-bit expert weights; ZeRO-2 only partitions what trains (LoRA).
        problems.append(
            "`quantization` (4-bit) cannot be combined with distributed.strategy='zero3': ZeRO-3 partitions every "
            "weight at load and cannot hold bitsandbytes 4-bit weights; use distributed.strategy: zero2 (QLoRA "
            "with partitioned optimizer state and gradients), ddp or auto, or drop `quantization`")
    if strategy == "auto":
        return problems
    train = _sub(raw, "train")
    engine_keys = [f"`train.{key}`" for key in ENGINE_TRAIN_KEYS if train.get(key) not in (None, "", False, {})]
    if engine_keys:
        problems.append(
            f"{', '.join(engine_keys)} and `distributed.strategy: {strategy}` both choose the distributed engine: "
            "drop the train key(s), or set `distributed.strategy: auto` to configure the engine yourself"
        )
    if strategy == "fsdp2" and raw.get("quantization") is not None:
        problems.append(
            "`quantization` cannot be used with `distributed.strategy: fsdp2`: FSDP2 shards parameters as DTensors "
            "and bitsandbytes 4-bit weights cannot be sharded that way; use `distributed.strategy: ddp` (each rank "
            "holds the whole 4-bit model) or drop `quantization`"
        )
    if strategy == "fsdp2" and raw.get("experts") is not None:
        problems.append(
            "`experts` (ESFT) cannot be used with `distributed.strategy: fsdp2`: its expert mask hooks the whole [E, ...] "
            "expert weights to keep the unselected experts' rows unchanged, and FSDP2 replaces those weights with "
            "per-rank shards, so the mask would silently stop working; use "
            "`distributed.strategy: ddp`, or drop `experts`"
        )
    return problems


_EP = "distributed.expert_parallel"


def _check_expert_parallel(raw: dict, strategy: str) -> list[str]:
    """What expert parallelism (experts sharded at load, moetune/expert_parallel.py) cannot run with. The rules that
    need the world size or the model's config are checked there, before any weight is read."""
    ep = _sub(raw, "distributed").get("expert_parallel", 1)
    if not isinstance(ep, int) or ep <= 1:
        return []
    problems = []
    if strategy not in ("auto", "fsdp2"):
        problems.append(f"`{_EP}`={ep} runs with FSDP2 over all ranks (transformers' DistributedConfig); it cannot "
                        f"be combined with distributed.strategy={strategy!r}. Use strategy auto or fsdp2, or {_EP}: 1")
    lora, freeze = raw.get("lora"), _sub(raw, "freeze")
    targets = lora.get("targets", ["attention"]) if isinstance(lora, dict) else []
    if isinstance(targets, list) and "experts" in targets:
        problems.append(f"`lora.targets` includes experts, which cannot be combined with `{_EP}`={ep}: PEFT's expert "
                        "LoRA (both lora.experts_path values) multiplies plain tensors with the sharded expert "
                        f"weights (DTensor) and fails; train the experts in full (freeze.train: [experts]) or set {_EP}: 1")
    if isinstance(lora, dict) and (freeze.get("train") or freeze.get("include")):
        problems.append(f"`freeze.train` / `freeze.include` beside `lora` cannot be combined with `{_EP}`={ep}: "
                        "PEFT keeps groups trained in full as copies of their modules (modules_to_save), and "
                        "the sharded (FSDP2) modules cannot be copied; use LoRA alone, or full fine-tuning "
                        f"without `lora`, or {_EP}: 1")
    if raw.get("experts") is not None:
        problems.append(f"`experts` (ESFT) cannot be combined with `{_EP}`={ep}: ESFT masks and saves slices of "
                        f"whole expert tensors, which expert parallelism splits across ranks; set {_EP}: 1")
    if raw.get("quantization") is not None:
        problems.append(f"`{_EP}`={ep} cannot be combined with `quantization` (4-bit): sharding bitsandbytes "
                        f"weights across ranks is not supported by transformers; drop `quantization` or set {_EP}: 1")
    return problems


@functools.lru_cache(maxsize=1)
def _sft_config_annotations() -> dict[str, str]:
    """Field name -> type annotation (source text) of trl.SFTConfig, read from the installed sources so that
    validation never imports torch. SFTConfig's own annotation wins over the TrainingArguments one it overrides."""
    annotations: dict[str, str] = {}
    for package, relpath, cls in (
        ("trl", "trainer/sft_config.py", "SFTConfig"),
        ("transformers", "training_args.py", "TrainingArguments"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(f"{package} is not installed")
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / relpath).read_text(encoding="utf-8"))
        body = next(n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                annotations.setdefault(node.target.id, ast.unparse(node.annotation))
    return {name: text for name, text in annotations.items() if not name.startswith("_")}


def sft_config_fields() -> frozenset[str]:
    """Field names of trl.SFTConfig (read from the sources: no torch import)."""
    return frozenset(_sft_config_annotations())


_SCALAR_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _scalar_kinds(annotation: str) -> tuple[set[str], bool] | None:
    """`({"int", "float", "bool"} subset, None allowed)` for an annotation made of those and None only, else None."""
    names = set(re.findall(r"[A-Za-z_]\w*", annotation)) - {"Optional", "Union"}
    if not names or not names <= {"int", "float", "bool", "None"}:
        return None
    return names - {"None"}, "None" in names or "Optional" in annotation


def _check_train_types(train: dict) -> list[str]:
    """Numbers and booleans of the `train` section against SFTConfig's types: TrainingArguments does not check
    them, and a string where a number belongs fails deep inside training with a raw TypeError."""
    problems = []
    annotations = _sft_config_annotations()
    for key, value in train.items():
        kinds = _scalar_kinds(annotations.get(key, ""))
        if kinds is None:
            continue
        allowed, optional = kinds
        if value is None:
            fits = optional
        elif isinstance(value, bool):
            fits = "bool" in allowed
        elif isinstance(value, int):
            fits = bool({"int", "float"} & allowed)
        elif isinstance(value, float):
            fits = "float" in allowed
        else:
            fits = False
        if not fits:
            expected = " or ".join(_SCALAR_WORDS[kind] for kind in ("int", "float", "bool") if kind in allowed)
            problems.append(f"`train.{key}` must be {expected}{' (or null)' if optional else ''}, got {value!r}")
    return problems


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
