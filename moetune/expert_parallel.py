"""Expert parallelism for `distributed.expert_parallel: N`: each rank holds num_experts / N experts per MoE layer.

transformers shards the experts at load time (`from_pretrained(distributed_config=DistributedConfig(fsdp_size=W,
ep_size=N))`): the family's `base_model_ep_plan` splits the fused expert weights along the expert dimension and
sends each token to its experts' rank by all-to-all; FSDP2 over all W ranks holds the rest (docs/upstream.md#expert-parallel).
HF Trainer then neither wraps nor shards the model again.

Checks run before any weight is read; errors name `distributed.expert_parallel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetune.errors import RecipeError


if TYPE_CHECKING:
    from torch import nn

    from moetune.config import Recipe

KEY = "distributed.expert_parallel"


def check_expert_parallel(recipe: Recipe, world_size: int, config=None) -> None:
    """Raise RecipeError when `distributed.expert_parallel` cannot run on `world_size` ranks.

    Args:
        recipe: the recipe.
        world_size: number of ranks launched.
        config: the model's transformers config (checks the expert count and the family's EP plan); None skips those.
    """
    ep = recipe.distributed.expert_parallel
    if ep == 1:
        return
    # What it cannot be combined with (strategy, expert LoRA, ESFT, 4-bit) is a recipe rule
    # (moetune/recipe_checks.py), reported with every other problem when the recipe loads.
    if world_size > 1 and world_size % ep:  # one process ignores the section (`moetune validate`, a test run)
        raise RecipeError(f"`{KEY}`={ep} must divide the number of processes launched ({world_size}); allowed: "
                          f"{_divisors(world_size)}")
    if config is None:
        return
    from moetune.architectures import _NUM_EXPERTS_KEYS, _config_value

    text = config.get_text_config(decoder=True)
    if not getattr(text, "base_model_ep_plan", None):
        raise RecipeError(f"`{KEY}`={ep}: transformers has no expert-parallel plan for model_type "
                          f"{text.model_type!r}; set {KEY}: 1")
    num_experts = _config_value(text, _NUM_EXPERTS_KEYS)
    if isinstance(num_experts, int) and num_experts % ep:
        raise RecipeError(f"`{KEY}`={ep} must divide the model's {num_experts} experts per layer; allowed: "
                          f"{[d for d in _divisors(num_experts) if world_size == 1 or world_size % d == 0]}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def distributed_config(recipe: Recipe, world_size: int, config=None):
    """The `DistributedConfig` for `from_pretrained`, or None when experts are not sharded (expert_parallel 1).

    FSDP over every rank (fsdp_size = world size) composed with EP: tensor parallelism stays off, because it needs
    a `tp_plan` many families lack and does not train inside HF Trainer on CPU.

    Raises:
        RecipeError: see `check_expert_parallel`.
    """
    ep = recipe.distributed.expert_parallel
    if ep == 1:
        return None
    check_expert_parallel(recipe, world_size, config)
    if world_size == 1:
        return None  # one process holds every expert; the `distributed` section is for several
    from transformers.distributed import DistributedConfig

    return DistributedConfig(fsdp_size=world_size, ep_size=ep)


def trainer_arguments(recipe: Recipe, world_size: int, *, resume: bool = False) -> dict:
    """Extra trl.SFTConfig kwargs for expert_parallel > 1: `save_only_model=True`.

    transformers 5.23's Trainer refuses to checkpoint a model sharded at load time unless `save_only_model=True`
    (docs/upstream.md#expert-parallel). moetune sets it, so Trainer writes the consolidated weights, and
    `MoETrainer` adds the optimizer, scheduler and RNG states itself (moetune/ep_checkpoint.py): `--resume`
    continues the run with the same trajectory. `resume` changes nothing here.
    """
    ep = recipe.distributed.expert_parallel
    if ep == 1 or world_size == 1:
        return {}
    return {"save_only_model": True}


def describe_sharding(model: nn.Module) -> str | None:
    """How the experts are held, for the start line; None when no expert weight is sharded.

    E.g. "experts sharded: 2 of 4 per layer on this rank (expert_parallel 2, DTensor)".
    """
    from torch.distributed.tensor import DTensor

    from moetune.architectures import find_moe_layers

    for layer in find_moe_layers(model):
        for param in layer.experts.parameters():
            if param.dim() == 3 and isinstance(param, DTensor):
                full, local = param.shape[0], param.to_local().shape[0]
                if local < full:
                    return f"experts sharded: {local} of {full} per layer on this rank (expert_parallel {full // local}, DTensor)"
    return None
