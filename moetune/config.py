"""The recipe schema: one strict, typed object per recipe section.

Every default lives here and nowhere else. Code takes the section it needs
(`load_model(recipe.model, recipe.quantization)`), so a typo in code is an AttributeError and a typo in a
recipe is a validation error that names the dotted key.
"""

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moetune.catalog import locate_packaged_data, resolve_recipe_source
from moetune.errors import RecipeError
from moetune.recipe_checks import (  # noqa: F401 -- TRAIN_KEYS_OWNED, sft_config_fields: read from here too
    TRAIN_KEYS_OWNED,
    check_cross,
    check_raw,
    did_you_mean,
    sft_config_fields,
)
from moetune.textfiles import NotUtf8Text, decode_utf8


logger = logging.getLogger(__name__)


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` are valid YAML floats but never a sensible rate or coefficient.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class ModelSection(Strict):
    name_or_path: str
    """Local directory or Hugging Face Hub id of the MoE model."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the weights that are not quantized (and the compute dtype of 4-bit layers)."""
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None
    """transformers' experts kernel. None picks grouped_mm where the family supports it, else eager."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repo (needed for families transformers does not ship)."""


class QuantizationSection(Strict):
    bits: Literal[4] = 4
    """Only 4-bit (QLoRA) is supported."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """bitsandbytes 4-bit data type; nf4 is QLoRA's."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.37 bits per parameter saved)."""


class LoraSection(Strict):
    r: int = Field(16, gt=0)
    """LoRA rank. Higher = more capacity and memory."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. With `experts` as a target it needs `experts_path: split` (PEFT's path has none)."""
    targets: list[str] = Field(default_factory=lambda: ["attention"], min_length=1)
    """Parameter groups (attention, shared_experts, dense_mlp, router, experts) or explicit module/parameter names."""
    experts_path: Literal["auto", "peft", "split"] = "auto"
    """How LoRA on fused experts computes: `peft` folds B@A into a full copy of each expert weight (PEFT's own
    path); `split` runs the LoRA on the routed tokens and never builds that copy (allows `dropout`); `auto` picks
    per model shape. Both save and load the same PEFT adapter."""


class FreezeSection(Strict):
    train: list[str] | None = None
    """Groups or presets trained in full: non_experts, experts, router, all, or group names.
    None means: nothing in full when LoRA is on (only adapters train), everything otherwise."""
    include: list[str] = Field(default_factory=list)
    """Regexes of parameter names to train in full as well."""
    exclude: list[str] = Field(default_factory=list)
    """Regexes of parameter names to keep frozen, applied last."""


class MoESection(Strict):
    aux_loss: bool = True
    """Add the router load-balancing loss to the training loss."""
    aux_loss_coef: float | None = Field(None, ge=0.0)
    """Its coefficient. None keeps the model's own default (0.001 for most families, 0.01 for OLMoE)."""
    z_loss_coef: float = Field(0.0, ge=0.0)
    """Router z-loss coefficient (ST-MoE uses 0.001). 0 turns it off."""
    expert_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the routed experts' hidden activations, training only (Switch Transformers fine-tuning)."""
    router_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    """Multiplicative uniform noise on the router input, x * U(1-eps, 1+eps), training only."""
    router_fp32: bool = True
    """Keep router weights and compute router logits in fp32 (selective precision, Switch Transformers)."""
    telemetry: bool = True
    """Record per-layer expert load, entropy and dead experts while training; write routing.json and routing.png."""


class ExpertSelectSection(Strict):
    score: Literal["tokens", "gate"] = "tokens"
    """What ranks the experts of a layer: `tokens` (share of routed slots, ESFT-Token) or `gate` (share of the
    routing weights, ESFT-Gate)."""
    top_p: float = Field(0.2, gt=0.0, le=1.0)
    """Per layer, the experts in score order until their cumulative share reaches this (ESFT uses 0.1-0.3)."""
    max_tokens: int = Field(20000, gt=0)
    """Training tokens the experts are scored on before training."""


class ExpertsSection(Strict):
    select: ExpertSelectSection = Field(default_factory=ExpertSelectSection)
    """Expert-specialized fine-tuning (ESFT): score the routed experts on the training data, then train only the
    selected ones; in full without `lora`, or with LoRA on the experts (`lora.targets` must include experts).
    Other groups train only when `freeze.train` names them."""


class DataSection(Strict):
    train: str
    """Training data: a local .jsonl/.json/.csv/.parquet file, or a Hub dataset id (optionally `id:split`)."""
    eval: str | None = None
    """Evaluation data, same forms as `train`."""
    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca", "text"] = "auto"
    """Row format. auto detects it from the columns: messages, conversations (sharegpt: `from`/`value` turns,
    human/gpt/system/tool), prompt + completion, instruction + output (alpaca), text."""
    max_length: int = Field(1024, gt=0)
    """Longest tokenized example; longer rows are counted and reported, then dropped."""
    packing: bool = False
    """Pack several examples into one sequence (padding-free, no cross-attention between them)."""
    assistant_only_loss: bool = True
    """Loss on the answer only: assistant turns for chat data, the completion (output) for prompt/completion and
    alpaca data. False trains on every token. Plain text always trains on every token."""


class OutputSection(Strict):
    dir: str
    """Output directory: the adapter (or full model) at its root, checkpoints, metrics.json, routing report."""
    push_to_hub: bool = False
    """Push the result to the Hub when training ends."""
    hub_repo_id: str | None = None
    """Hub repo to push to (required when push_to_hub is true)."""
    private: bool = True
    """Create the Hub repo as private."""
    sample_prompts: int = Field(0, ge=0)
    """Print the model's answers to this many eval prompts before and after training (0: none)."""


class DistributedSection(Strict):
    strategy: Literal["auto", "ddp", "fsdp2", "zero2", "zero3"] = "auto"
    """How several ranks share the model. auto: what the launcher set up (an accelerate config or flags; DDP when
    it set up nothing else). ddp; fsdp2 (each decoder layer one FSDP2 unit, its fused experts sharded along the
    expert dimension, E/N per rank, and gathered together while the layer runs; checkpoints and the final save
    consolidated; runs on CPU ranks too; not with `quantization` or `experts`); zero2 (optimizer state and
    gradients partitioned; 4-bit works); zero3 (weights too; not with `quantization`). Set to anything but auto,
    moetune configures the engine itself, so `torchrun` or a plain `accelerate launch` runs it, a launcher
    asking for a different one is an error, and `train.fsdp` / `train.deepspeed` must not be set. zero2/zero3 need
    `pip install moetune[deepspeed]`. See docs/distributed.md."""
    expert_parallel: int = Field(1, ge=1)
    """Ranks that each MoE layer's experts are split over (transformers' expert parallelism: each rank holds
    num_experts / N experts and tokens travel to their experts by all-to-all), composed with FSDP2 over all ranks.
    Must divide the world size and the expert count; not with LoRA on the experts, `experts` (ESFT) or 4-bit.
    `--resume` works (tested on the same number of ranks). 1: every rank holds every expert."""


class Recipe(Strict):
    model: ModelSection
    """The model to fine-tune and how to load it."""
    quantization: QuantizationSection | None = None
    """4-bit loading. Omit for none."""
    lora: LoraSection | None = None
    """LoRA adapters. Omit for full or selective fine-tuning."""
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    """What trains in full, by parameter group, preset or regex."""
    moe: MoESection = Field(default_factory=MoESection)
    """Router losses, router and expert regularisation, routing telemetry."""
    experts: ExpertsSection | None = None
    """Train only the experts that the training data routes to (ESFT). Omit to train every expert."""
    data: DataSection
    """Training and evaluation data, their format, and how examples are cut and packed."""
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    """How the work is shared when several processes are launched (ignored by a single process)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Any trl SFTConfig field, passed through (learning_rate, num_train_epochs, per_device_train_batch_size, ...)."""
    output: OutputSection
    """Where the result goes (output dir, Hub), and sample answers before and after training."""


# --------------------------------------------------------------------------------------------------------------
# Loading: YAML (or a dict) + `key.path=value` overrides -> a validated Recipe, every problem reported at once.
# Nothing here imports torch, transformers or trl: a recipe mistake must surface in well under a second.



class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2), not the string PyYAML's YAML 1.1 rules give."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d[\d_]*[eE][-+]?\d+|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML: {err}") from None


def load_recipe(source: "str | Path | dict | Recipe", overrides: Sequence[str] = (), *,
                log_warnings: bool = True) -> Recipe:
    """Read, override and validate a recipe; raise one `RecipeError` listing every problem found.

    Args:
        source: a YAML file path or a packaged recipe's name (`demo`, `mixtral/8x7b_qlora_attention`; an existing
            path wins), a dict with the recipe's sections, or a `Recipe` (re-validated with overrides).
        overrides: `key.path=value` strings; the value is read as YAML (`train.learning_rate=1e-4`,
            `lora=null` removes a section, `lora.targets=[attention,experts]`).
        log_warnings: log `recipe_warnings` (suspicious but legal settings) on the `moetune.config` logger.
    """
    where = "recipe"
    if isinstance(source, Recipe):
        raw = source.model_dump(exclude_unset=True)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        where = str(source)
        recipe_file = resolve_recipe_source(source)  # a path, or a packaged name
        raw = parse_yaml(_read_recipe_text(recipe_file), where)
        if raw is None:
            raise RecipeError(f"{where}: the recipe is empty; it needs at least the sections model, data and output")
        if isinstance(raw, dict):
            locate_packaged_data(raw, recipe_file)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of sections (model, data, output, ...), got {type(raw).__name__}")
    problems = [_apply_override(raw, item) for item in overrides]
    problems = [p for p in problems if p]
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        recipe = None
        problems += [_explain(e) for e in err.errors()]
    problems += check_raw(raw) + check_cross(raw)
    if problems:
        head = f"{where} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:"
        raise RecipeError("\n  - ".join([head, *problems]))
    if log_warnings:
        for warning in recipe_warnings(recipe):
            logger.warning(warning)
    return recipe


def _read_recipe_text(path: Path) -> str:
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise RecipeError(f"{path}: is a directory, not a recipe file{hint}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {str(path)!r}")
    try:
        return decode_utf8(path.read_bytes())
    except NotUtf8Text as err:
        raise RecipeError(f"{path}: {err}") from None


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Settings that are legal but almost certainly not what the user meant, one line each."""
    warnings = []
    if not recipe.moe.aux_loss and recipe.moe.aux_loss_coef is not None:
        warnings.append(f"`moe.aux_loss_coef` ({recipe.moe.aux_loss_coef}) has no effect because `moe.aux_loss` is "
                        "false; remove one of the two")
    train = recipe.train
    if _is_zero(train.get("max_steps")):
        # TrainingArguments treats max_steps <= 0 as "not set" and trains for num_train_epochs instead.
        epochs = train.get("num_train_epochs", 3.0)  # TrainingArguments' default
        warnings.append(f"`train.max_steps: 0` is not a limit: values <= 0 mean unset, so training runs for "
                        f"`train.num_train_epochs` instead ({epochs} epochs)")
    positive_steps = isinstance(train.get("max_steps"), int) and train["max_steps"] > 0
    if _is_zero(train.get("num_train_epochs")) and not positive_steps:
        warnings.append("`train.num_train_epochs: 0` trains for zero steps: the output is the untrained model")
    return warnings


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in), as written to `<output.dir>/recipe.yaml`."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _apply_override(raw: dict, item: str) -> str | None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"override {item!r} must look like key.path=value (e.g. train.learning_rate=1e-4)"
    try:
        value = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        return f"override `{key}`: value {text!r} is not valid YAML ({err.problem})"
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            return f"override `{key}`: `{'.'.join(parts[: i + 1])}` is {node[part]!r}, not a section"
        node = node[part]
    node[parts[-1]] = value
    return None


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _explain(error: dict) -> str:
    """One pydantic error -> `key.path`: what is wrong, what was given, what is allowed."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        section = _section_model(loc[:-1])
        allowed = list(section.model_fields) if section else []
        hint = did_you_mean(_ALIASES.get(loc[-1], loc[-1]), allowed)
        return f"unknown key `{key}`{hint}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"`{key}` is required"
    if kind == "literal_error":
        return f"`{key}`: got {given!r}; allowed: {error['ctx']['expected']}"
    if kind == "model_type":
        return f"`{key}` must be a section (a mapping of keys), got {given!r}"
    if kind == "finite_number":
        return f"`{key}` must be a finite number, got {given!r}"
    return f"`{key}`: {error['msg'][0].lower()}{error['msg'][1:]} (got {given!r})"


# Names other tools use for our keys, so the did-you-mean can point at ours.
_ALIASES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets", "model_name": "name_or_path",
            "output_dir": "dir", "torch_dtype": "dtype", "dataset": "train", "max_seq_length": "max_length"}

