"""DeepSpeed ZeRO for `distributed.strategy: zero2|zero3`: moetune writes the DeepSpeed config itself.

The config goes to trl.SFTConfig as `deepspeed=<dict>` (HF Trainer fills the "auto" values from the training
arguments), so `torchrun` or `accelerate launch --multi_gpu --num_processes N -m moetune train RECIPE` runs it; no
accelerate DeepSpeed config file is needed. On CPU ranks DeepSpeed runs over gloo (docs/upstream.md#deepspeed-cpu).

ZeRO-3 and MoE: upstream reports hangs when ranks route tokens to different experts, fixed by making the MoE block a
ZeRO-3 leaf. transformers v5 fuses each layer's experts into one module that runs on every forward, so every
rank gathers the same parameters: measured here, no hang with a rank whose experts 2-3 get no token, and leaf
blocks break full fine-tuning of the experts (an empty partition reaches backward). moetune therefore turns
DeepSpeed's default leaf classes off (docs/upstream.md#deepspeed-zero3-moe).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from moetune.errors import MoetuneError


if TYPE_CHECKING:
    from torch import nn

    from moetune.config import Recipe

ZERO_STAGES = {"zero2": 2, "zero3": 3}
INSTALL_HINT = "pip install moetune[deepspeed]"


def require_deepspeed(strategy: str) -> None:
    """Raise a one-line error (no traceback) when the `deepspeed` package is missing."""
    from importlib.util import find_spec

    if find_spec("deepspeed") is None:
        raise MoetuneError(f"distributed.strategy={strategy!r} needs DeepSpeed, which is not installed: {INSTALL_HINT}")


def deepspeed_config(stage: int) -> dict[str, Any]:
    """The DeepSpeed config dict. "auto" values are filled by HF Trainer from trl.SFTConfig (batch size,
    accumulation, clipping, precision, optimizer/scheduler stay the Trainer's own)."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # One consolidated 16-bit (model-dtype) state dict on save: the output dir holds a normal HF
        # model / PEFT adapter, not only DeepSpeed's per-rank partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # No MoE leaf modules. DeepSpeed 0.19 makes Mixtral's and Qwen2/3-MoE's blocks leaves by default, which
        # breaks full fine-tuning of fused experts in backward; fused experts need no leaf to avoid the hang.
        zero["leaf_module"] = {"classes": []}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 10**9,  # DeepSpeed's own progress lines; moetune prints its own
        "wall_clock_breakdown": False,
    }


def deepspeed_arguments(recipe: Recipe, *, world_size: int | None = None) -> dict[str, Any]:
    """Extra trl.SFTConfig kwargs for `distributed.strategy: zero2|zero3`; {} for any other strategy.

    DeepSpeed must be installed whatever the world size (`moetune validate` on one process reports it), but one
    process gets no DeepSpeed config: the `distributed` section is ignored there. What ZeRO cannot be combined with
    is a recipe rule (moetune/recipe_checks.py), reported when the recipe loads.

    Args:
        recipe: the recipe.
        world_size: ranks launched; None reads accelerate's process state.

    Raises:
        MoetuneError: DeepSpeed is not installed.
    """
    strategy = recipe.distributed.strategy
    if strategy not in ZERO_STAGES:
        return {}
    require_deepspeed(strategy)
    if world_size is None:
        from accelerate import PartialState

        world_size = PartialState().num_processes
    if world_size == 1:
        return {}
    _init_distributed()
    _let_accelerate_pick_deepspeed()
    return {"deepspeed": deepspeed_config(ZERO_STAGES[strategy])}


def _init_distributed() -> None:
    """ZeRO-3 loads each weight straight into its partition (`zero.Init`), which needs DeepSpeed's process group
    before `from_pretrained`; HF Trainer would create it only later. Reuses torch's group when one exists."""
    import torch

    if not torch.distributed.is_initialized():
        return  # one process (`moetune validate`, a single-rank run): nothing to join
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def _let_accelerate_pick_deepspeed() -> None:
    """Drop ACCELERATE_USE_CPU for this process once its process group runs on CPU (gloo).

    The flag is what makes CPU ranks one gloo group under `accelerate launch` (docs/upstream.md#accelerate-cpu), but
    `AcceleratorState` also reads it as "CPU: no DeepSpeed" and falls back to DDP (accelerate 1.15, state.py:
    `ACCELERATE_USE_DEEPSPEED ... and not cpu`). The group it was needed for exists by now, so the flag has done its
    job; without it the Trainer's Accelerator sets up DEEPSPEED over the same gloo group.
    """
    import os

    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        os.environ.pop("ACCELERATE_USE_CPU", None)


def describe_sharding(model: nn.Module) -> str | None:
    """How DeepSpeed holds the weights, for the start line; None when no parameter is DeepSpeed-partitioned.

    ZeRO-3 parameters carry `ds_id` / `ds_status` (and `ds_numel`, the full size): the local part is `ds_tensor`.
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return None
    full = sum(p.ds_numel for p in params)
    local = sum(p.ds_tensor.numel() for p in params)
    return f"ZeRO-3: {len(params)} parameters partitioned, {local:,} of {full:,} elements held on this rank"


@contextmanager
def zero3_init_off():
    """Build models the ordinary way while a ZeRO-3 run is configured.

    Once a trl.SFTConfig with ZeRO-3 exists, transformers builds every model under `deepspeed.zero.Init`, which
    partitions with a collective on each parameter. An architecture-only model built on one rank (the PEFT skeleton
    that `make_adapter_portable` checks an adapter against, on the main process only) would then wait forever for
    the other ranks. Lifts the setting for the block and puts it back.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # public setter/unsetter; the getter is this weakref
    held = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)
