"""A training run's output directory, read back: the recipe that made it, what it holds (a LoRA adapter or a full
model) and how to load that the way training had it (base model, dtype, 4-bit, fp32 router).

Everything that uses a finished run (`moetune chat`/`generate`/`merge`/`push`, the model card) starts here, so a
run dir moved elsewhere or used from another working directory is read the same way everywhere.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moetune.config import ModelSection, QuantizationSection, Recipe, parse_yaml
from moetune.errors import MoetuneError
from moetune.rules import is_local_model_path


RECIPE_FILE = "recipe.yaml"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
EXPERT_SELECTION = "expert_selection.json"  # moetune.esft.SELECTION_FILE (torch-free here)
_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TrainedRun:
    """What a run directory holds. `recipe` is None for a directory not written by moetune (e.g. a merged model
    copied elsewhere, or an adapter saved by plain PEFT)."""

    path: Path
    recipe: Recipe | None
    adapter_config: dict[str, Any] | None
    model_config: dict[str, Any] | None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def is_expert_delta(self) -> bool:
        """A full expert-specialized run: only the changed slices (`moetune.esft`), loaded onto the base."""
        return not self.is_adapter and self.model_config is None and (self.path / EXPERT_SELECTION).is_file()

    @property
    def on_base(self) -> bool:
        """Whether loading starts from the base model (adapters, expert deltas) rather than this directory."""
        return self.is_adapter or self.is_expert_delta

    @property
    def base(self) -> str:
        """The base model of an adapter (absolute path or Hub id), or of the run that produced a full model."""
        candidates = []
        if self.adapter_config is not None:
            candidates.append(self.adapter_config.get("base_model_name_or_path"))
        if self.recipe is not None:
            candidates.append(self.recipe.model.name_or_path)
        for name in filter(None, candidates):
            if Path(name).expanduser().is_dir() or not is_local_model_path(name):
                return name
        if not self.on_base:
            return str(self.path)
        raise MoetuneError(
            f"cannot find the base model of the adapter in {self.path}: {ADAPTER_CONFIG} and {RECIPE_FILE} name "
            f"{[c for c in candidates if c]}, which do not exist from {Path.cwd()}. Run from the directory training "
            "ran in, or fix `base_model_name_or_path` in adapter_config.json"
        )

    @property
    def quantization(self) -> QuantizationSection | None:
        """4-bit settings for the base of an adapter trained on a 4-bit base. A full model is never quantized
        (a merged model of a 4-bit run is a plain full-precision checkpoint)."""
        return self.recipe.quantization if self.recipe is not None and self.is_adapter else None

    @property
    def router_fp32(self) -> bool:
        return self.recipe.moe.router_fp32 if self.recipe is not None else True

    def model_section(self, dtype: str | None = None) -> ModelSection:
        """How to load the weights: the base model (adapters) or this directory (full or merged models), with the
        recipe's dtype, experts kernel and trust_remote_code. `dtype` overrides the dtype."""
        settings = self.recipe.model.model_dump() if self.recipe is not None else {}
        if not self.on_base:
            # A merged model is saved in its own dtype, which may differ from the training recipe's.
            saved = (self.model_config or {}).get("dtype") or (self.model_config or {}).get("torch_dtype")
            if saved in _DTYPES:
                settings["dtype"] = saved
        if dtype is not None:
            settings["dtype"] = dtype
        settings["name_or_path"] = self.base if self.on_base else str(self.path)
        return ModelSection(**settings)

    @property
    def tokenizer_source(self) -> str:
        """Training saves the tokenizer (with its chat template) beside the weights; fall back to the base's."""
        return str(self.path) if (self.path / TOKENIZER_CONFIG).is_file() else self.base


def read_run_recipe(path: Path) -> Recipe | None:
    """The resolved recipe a run dir was trained with, or None. Validated as a schema only: its data files and
    relative paths were checked when it ran, and need not exist from here."""
    file = path / RECIPE_FILE
    if not file.is_file():
        return None
    try:
        return Recipe.model_validate(parse_yaml(file.read_text(encoding="utf-8"), str(file)))
    except ValidationError as err:
        first = err.errors()[0]
        raise MoetuneError(f"{file} is not a valid moetune recipe: `{'.'.join(map(str, first['loc']))}`: "
                           f"{first['msg']}") from None


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoetuneError(f"{file} is not valid JSON: {err}") from None


def read_run_dir(path: str | Path) -> TrainedRun:
    """Read what a run directory (or any local model / adapter directory) holds.

    Raises:
        MoetuneError: the path is not a directory, or holds neither an adapter nor a model.
    """
    run = Path(path).expanduser()
    if not run.is_dir():
        raise MoetuneError(f"{str(path)!r} is not a directory")
    adapter_config, model_config = _read_json(run / ADAPTER_CONFIG), _read_json(run / MODEL_CONFIG)
    if adapter_config is None and model_config is None and not (run / EXPERT_SELECTION).is_file():
        raise MoetuneError(f"{str(path)!r} holds neither an adapter ({ADAPTER_CONFIG}) nor a model ({MODEL_CONFIG}): "
                           "is training still running, or did it fail before saving?")
    return TrainedRun(path=run, recipe=read_run_recipe(run), adapter_config=adapter_config, model_config=model_config)
