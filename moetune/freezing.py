"""What trains in full: parameter groups, presets and regexes from the recipe's `freeze` section.

Runs after adapters were added: PEFT has frozen the base model and made its own parameters trainable, and those
stay as they are. Everything else is decided here, from the architecture map's groups (`classify_parameters`).
"""

import re
from dataclasses import dataclass, field

from torch import nn

from moetune.architectures import canonical_name, classify_parameters
from moetune.config import FreezeSection
from moetune.errors import MoetuneError
from moetune.rules import ADAPTER_GROUP, FREEZE_NAMES, GROUPS, expand_freeze_names
from moetune.rules import PRESETS as PRESETS  # owned by moetune.rules (recipe validation uses it too)


@dataclass
class FreezeReport:
    """Trainable and total parameter counts per group (4-bit packed weights counted as their logical size)."""

    trainable_by_group: dict[str, int] = field(default_factory=dict)
    total_by_group: dict[str, int] = field(default_factory=dict)
    trained_in_full: list[str] = field(default_factory=list)  # groups with at least one parameter trained in full

    @property
    def trainable(self) -> int:
        return sum(self.trainable_by_group.values())

    @property
    def total(self) -> int:
        return sum(self.total_by_group.values())

    def format_table(self) -> str:
        """The table printed at train start: one row per group, then the total; one line when everything trains."""
        if self.trainable == self.total and ADAPTER_GROUP not in self.total_by_group:
            return f"training every parameter in full: {self.total:,} ({', '.join(self.total_by_group)})"
        lines = [f"{'group':<18}{'trainable':>14}{'total':>14}{'%':>8}"]
        for group, total in self.total_by_group.items():
            trainable = self.trainable_by_group.get(group, 0)
            lines.append(f"{group:<18}{trainable:>14,}{total:>14,}{100 * trainable / max(total, 1):>7.1f}%")
        lines.append(f"{'total':<18}{self.trainable:>14,}{self.total:>14,}{100 * self.trainable / max(self.total, 1):>7.1f}%")
        return "\n".join(lines)


def _logical_numel(param: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per uint8 (Params4bit and the experts' parametrizations alike)
    if hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3: the local tensor is a placeholder; ds_numel is the full size
        return param.ds_numel
    return param.numel() * 2 if not param.dtype.is_floating_point and param.element_size() == 1 else param.numel()


def _compile(patterns: list[str], key: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise MoetuneError(f"`freeze.{key}` has an invalid regex {pattern!r}: {err}") from err
    return compiled


def _selected_groups(train: list[str] | None, lora_enabled: bool) -> set[str]:
    if train is None:
        return set() if lora_enabled else set(GROUPS)
    unknown = [name for name in train if name not in FREEZE_NAMES]
    if unknown:
        raise MoetuneError(f"`freeze.train` has unknown name(s) {unknown}; allowed: {', '.join(FREEZE_NAMES)}")
    return expand_freeze_names(train)


def _decide(model: nn.Module, freeze: FreezeSection, lora_enabled: bool) -> list[tuple[str, nn.Parameter, str, bool]]:
    """(name, parameter, group, train in full?) for every parameter; raises before anything changes."""
    groups_to_train = _selected_groups(freeze.train, lora_enabled)
    include = _compile(freeze.include, "include")
    exclude = _compile(freeze.exclude, "exclude")
    groups = classify_parameters(model)
    decisions: list[tuple[str, nn.Parameter, str, bool]] = []
    quantized: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        group = groups[name]
        if group == ADAPTER_GROUP:
            decisions.append((name, param, group, param.requires_grad))  # PEFT decides for its own parameters
            continue
        canonical = canonical_name(name)
        train = group in groups_to_train or any(p.search(canonical) for p in include)
        train = train and not any(p.search(canonical) for p in exclude)
        # PEFT's modules_to_save keeps the untouched original beside the trained copy; the original stays frozen.
        train = train and ".original_module." not in name
        if train and not param.dtype.is_floating_point:
            quantized.setdefault(group, []).append(canonical)
        decisions.append((name, param, group, train))
    if quantized:  # checked before anything changes, so a failed call leaves the model as it was
        details = "; ".join(f"{group}: {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                            for group, names in quantized.items())
        raise MoetuneError(
            f"`freeze` selects quantized (4-bit) weights for full training, which is impossible ({details}). "
            "Train these groups with LoRA (`lora.targets`) or keep them frozen with `freeze.exclude`."
        )
    return decisions


def modules_trained_in_full(model: nn.Module, freeze: FreezeSection) -> list[str]:
    """Names of the modules holding parameters that `freeze` trains in full alongside LoRA.

    PEFT saves only adapter weights unless such modules are listed in `LoraConfig.modules_to_save`; pass this list
    to `add_adapters(..., modules_to_save=...)` so the adapter directory carries them and
    `PeftModel.from_pretrained` restores them.
    """
    owners = sorted({canonical_name(name).rsplit(".", 1)[0]
                     for name, _, group, train in _decide(model, freeze, lora_enabled=True)
                     if train and group != ADAPTER_GROUP})
    # Only outermost modules: the copy PEFT makes of a module includes its children, and listing a child as well
    # (ernie's router holds `moe_statics`) breaks PEFT's loading of the saved adapter with a KeyError.
    return [name for name in owners if not any(name.startswith(f"{other}.") for other in owners)]


def freeze(model: nn.Module, freeze: FreezeSection, *, lora_enabled: bool) -> FreezeReport:
    """Set `requires_grad` on every non-adapter parameter of `model` from the `freeze` section.

    A parameter trains in full when its group is selected by `freeze.train` (presets non_experts, experts, router,
    all, or group names) or its canonical name matches a `freeze.include` regex, unless it matches a
    `freeze.exclude` regex. `freeze.train: null` trains nothing in full with LoRA and everything without.
    Adapter parameters (PEFT's) are left as PEFT set them.

    Args:
        model: the model, after adapters were added (if any).
        freeze: the recipe's `freeze` section.
        lora_enabled: whether adapters were added.

    Returns:
        The per-group trainable counts (`format_table()` for the start-of-training table).

    Raises:
        MoetuneError: an unknown group or preset, an invalid regex, or a quantized weight selected for full
            training (4-bit weights cannot be trained; use LoRA on that group instead).
    """
    decisions = _decide(model, freeze, lora_enabled)
    report = FreezeReport()
    for _, param, group, train in decisions:
        size = _logical_numel(param)
        report.total_by_group[group] = report.total_by_group.get(group, 0) + size
        if group != ADAPTER_GROUP:
            param.requires_grad_(train)
        if train:
            report.trainable_by_group[group] = report.trainable_by_group.get(group, 0) + size
            if group != ADAPTER_GROUP and group not in report.trained_in_full:
                report.trained_in_full.append(group)
    return report
