"""The naming rules that recipe validation and the runtime must agree on, each with exactly one owner.

`config.py` (validation, which must never import torch so that `moetune validate` stays instant) and the runtime
modules (`architectures`, `freezing`, `adapters`, `loading`, `data`, `quantization`) all import these, so a recipe
that validates is one that trains. Pure data and string rules only: no torch, transformers or trl, at import
time or inside a function (`tests/test_rules.py` checks).
"""

import os
import re
from collections.abc import Iterable
from pathlib import Path


# ------------------------------------------------------------------------------------------- parameter groups

BASE_GROUPS = ("embedding", "attention", "router", "experts", "shared_experts", "dense_mlp", "norm", "lm_head")
MIXER_GROUPS = ("mamba", "linear_attention")  # real non-attention token mixers get a group of their own
ADAPTER_GROUP = "adapter"  # PEFT's own parameters (lora_A, lora_B, ...) in a wrapped model
GROUPS = BASE_GROUPS + MIXER_GROUPS

# ------------------------------------------------------------------------------- freeze presets (`freeze.train`)

# ST-MoE found training everything but the routed experts nearly as good as full fine-tuning ("non_experts"),
# and training only the experts much worse; the other presets are for ablations and router-only tuning.
PRESETS: dict[str, tuple[str, ...]] = {
    "non_experts": tuple(g for g in GROUPS if g != "experts"),
    "experts": ("experts",),
    "router": ("router",),
    "all": GROUPS,
}
# Every name `freeze.train` accepts: the presets, then the groups that are not also a preset name.
FREEZE_NAMES = tuple(PRESETS) + tuple(g for g in GROUPS if g not in PRESETS)


def expand_freeze_names(names: Iterable[str]) -> set[str]:
    """The parameter groups that `freeze.train` entries select: presets expand, group names stand for themselves.

    Names outside `FREEZE_NAMES` are passed through unchanged; rejecting them is the caller's job (validation
    and `freezing.freeze` both do, with their own error types).
    """
    groups: set[str] = set()
    for name in names:
        groups.update(PRESETS.get(name, (name,)))
    return groups


# -------------------------------------------------------------------------------- LoRA groups (`lora.targets`)

LORA_GROUPS = ("attention", "shared_experts", "dense_mlp", "router", "experts")

# ----------------------------------------------------------------------------------- which weights are experts'

_ADAPTER_NAME = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def is_adapter_name(name: str) -> bool:
    """True for a PEFT adapter's own parameter or module (`...q_proj.lora_A.default.weight`)."""
    return _ADAPTER_NAME.search(name) is not None


def is_expert_param(name: str, router_name: str) -> bool:
    """Whether a parameter found in an experts module belongs to the experts (weights and biases).

    Not an adapter parameter, and not under the router: JetMoE keeps its router inside the module that holds the
    expert weights. `name` and `router_name` must be in the same naming (both full names, or both relative to the
    MoE block).
    """
    return not is_adapter_name(name) and not name.startswith(router_name + ".")


def is_expert_weight(name: str, router_name: str = "") -> bool:
    """An expert parameter (`is_expert_param`) that is a weight, not a bias (gpt_oss' `gate_up_proj_bias`).

    What counts is the name only; callers also require >= 2 dimensions (3-D fused stacks, dbrx' 2-D [E*F, H]).
    An empty `router_name` skips the router check (for names already known to lie outside the router).
    """
    return not name.endswith("bias") and is_expert_param(name, router_name)


# ------------------------------------------------------------------------------------ local paths vs Hub ids

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_model_path(name: str) -> bool:
    """True when `model.name_or_path` means a local directory rather than a Hub id.

    Hub ids are `name` or `org/name`. Anything that exists on disk, starts with `.`, `/` or `~`, has more than
    one `/`, or contains the OS path separator is meant as a local path.
    """
    return (
        Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def is_local_data_source(source: str) -> bool:
    """True when `data.train` / `data.eval` means a local file rather than a Hub dataset id (`id` or `id:split`).

    A data-file suffix (`DATA_SUFFIXES`), a leading `.`, `/` or `~`, or an existing path makes it local.
    """
    path = Path(source).expanduser()
    return path.suffix.lower() in DATA_SUFFIXES or source.startswith((".", "/", "~")) or path.exists()


def is_hub_id(name: str) -> bool:
    """True when `name` has the shape of a Hub repo id, `name` or `owner/name` (existence is not checked)."""
    return _HUB_ID.match(name) is not None
