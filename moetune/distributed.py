"""The recipe's `distributed` section -> what transformers' Trainer and accelerate need to run it.

`strategy: ddp|fsdp2|zero2|zero3` makes moetune configure the engine itself (trl.SFTConfig's `fsdp`/`fsdp_config`
or `deepspeed`), so a plain `torchrun --nproc_per_node N -m moetune train R` or `accelerate launch --num_processes N
-m moetune train R` runs it unchanged; `auto` leaves the engine to the launcher (an accelerate config or flags).
A launcher that asks for another engine than the recipe is an error, never a quiet choice of one of the two.

FSDP2 uses Trainer's own FSDP support (accelerate's `fsdp2_prepare_model`): TRANSFORMER_BASED_WRAP with no class
named, so accelerate wraps the model's `_no_split_modules` (its decoder layers). A layer's router and fused experts
live inside that unit, so FSDP2 shards the 3-D expert weights along dim 0 (the expert dimension: E/N experts per
rank) and gathers a layer's experts together, once, while that layer runs. FULL_STATE_DICT makes every save (the
checkpoints and the final model or adapter) one consolidated Hugging Face checkpoint that loads on one process.
"""

import os
from collections.abc import Mapping
from typing import Any

from moetune.config import Recipe
from moetune.errors import MoetuneError


# What the launcher asked for, read from the environment accelerate's launcher sets.
_LAUNCHER_ENGINE = {"ACCELERATE_USE_FSDP": "fsdp", "ACCELERATE_USE_DEEPSPEED": "deepspeed"}
_ENGINE_OF = {"ddp": None, "fsdp2": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed"}

FSDP2_CONFIG = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # no class named: accelerate takes model._no_split_modules
    "reshard_after_forward": True,  # a layer's experts are freed again after its forward (ZeRO-3-like memory)
    "state_dict_type": "FULL_STATE_DICT",  # consolidated checkpoints and final save (loads on one process)
    "cpu_ram_efficient_loading": False,  # every rank loads the (already loaded) model; needs no meta-device init
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Processes in the run, as torchrun / accelerate launch set WORLD_SIZE (1 when not launched)."""
    return int(environ.get("WORLD_SIZE", "1") or 1)


def launcher_engine(environ: Mapping[str, str] = os.environ) -> str | None:
    """'fsdp' / 'deepspeed' when the launcher asked for one (accelerate config or flags), else None."""
    asked = [engine for flag, engine in _LAUNCHER_ENGINE.items() if _truthy(environ.get(flag))]
    return asked[0] if asked else None


def resolved_strategy(recipe: Recipe, environ: Mapping[str, str] = os.environ) -> str:
    """The strategy this process runs: the recipe's, or for `auto` the launcher's ('ddp' when it asked for none,
    'fsdp2' / 'fsdp1' for an accelerate FSDP launch, 'deepspeed' for a DeepSpeed one). 'single' on one process,
    'expert_parallel' when transformers shards the model at load (`distributed.expert_parallel` > 1).

    Raises:
        MoetuneError: the launcher asked for another engine than `distributed.strategy`.
    """
    strategy = recipe.distributed.strategy
    engine = launcher_engine(environ)
    if strategy != "auto" and engine is not None and engine != _ENGINE_OF[strategy]:
        flag = next(f for f, e in _LAUNCHER_ENGINE.items() if e == engine)
        raise MoetuneError(
            f"`distributed.strategy` is {strategy!r} but the launcher asked for {engine.upper()} ({flag}=true, from "
            "an accelerate config file or flags): drop the engine from the launch (a plain `accelerate launch "
            f"--num_processes N` or `torchrun`) or set `distributed.strategy: auto` to follow the launcher"
        )
    if strategy == "fsdp2" and engine == "fsdp" and environ.get("FSDP_VERSION", "2") != "2":
        raise MoetuneError(
            f"`distributed.strategy` is 'fsdp2' but the launcher asked for FSDP version {environ['FSDP_VERSION']} "
            "(FSDP_VERSION); use `--fsdp_version 2` (or fsdp_version: 2 in the accelerate config)"
        )
    if world_size(environ) == 1:
        return "single"
    if recipe.distributed.expert_parallel > 1:
        if engine is not None:
            raise MoetuneError(
                f"`distributed.expert_parallel` shards the model when it loads (transformers' FSDP2 + expert "
                f"parallelism), so the launcher's {engine.upper()} would wrap it a second time: launch without an "
                "engine (`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N`)"
            )
        return "expert_parallel"
    if strategy != "auto":
        return strategy
    if engine == "fsdp":
        if environ.get("FSDP_VERSION", "1") == "2":
            return "fsdp2"
        import torch

        if not torch.cuda.is_available():  # accelerate would stop with a RuntimeError traceback in its FSDP plugin
            raise MoetuneError(
                f"the launcher asked for FSDP version {environ.get('FSDP_VERSION', '1')} (ACCELERATE_USE_FSDP=true, "
                "FSDP_VERSION), which accelerate cannot run on CPU ranks; moetune runs FSDP2 there: launch with "
                "`--fsdp_version 2`, or set `distributed.strategy: fsdp2` and drop the FSDP flags"
            )
        return "fsdp1"
    return engine or "ddp"


def trainer_arguments(recipe: Recipe, environ: Mapping[str, str] = os.environ, *, resume: bool = False) -> dict[str, Any]:
    """trl.SFTConfig keyword arguments for the recipe's strategy (nothing for auto, ddp and a single process)."""
    if recipe.distributed.strategy in ("zero2", "zero3"):
        # DeepSpeed's config is built by moetune.deepspeed_setup (installed with moetune[deepspeed]); it checks the
        # recipe and the install on one process too, then gives one process no DeepSpeed config.
        from moetune.deepspeed_setup import deepspeed_arguments

        return deepspeed_arguments(recipe)
    strategy = resolved_strategy(recipe, environ)
    if recipe.distributed.expert_parallel > 1:
        # transformers already shards the model at load (DistributedConfig: FSDP2 over all ranks + EP), so
        # accelerate's FSDP must not wrap it a second time: only the checkpoint settings change.
        from moetune.expert_parallel import trainer_arguments as expert_parallel_arguments

        return expert_parallel_arguments(recipe, world_size(environ), resume=resume)
    if recipe.distributed.strategy == "auto" or strategy in ("single", "ddp"):
        return {}
    return {"fsdp": True, "fsdp_config": dict(FSDP2_CONFIG)}  # fsdp2


def full_state_dict_for_save(trainer) -> None:
    """Make the trainer's next `save_model` write one consolidated model or adapter under FSDP.

    With SHARDED_STATE_DICT (accelerate's default for an FSDP launch) `Trainer.save_model` writes nothing at all;
    the final model must load on one process, so it is gathered whatever the checkpoints use.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def keep_routers_fp32(trainer, recipe: Recipe) -> None:
    """FSDP2 with bf16/fp16 mixed precision: each router becomes its own FSDP2 unit that computes in fp32.

    accelerate gives every FSDP2 unit one MixedPrecisionPolicy, which casts all of a decoder layer's parameters,
    router included, to bf16 for the forward; `moe.router_fp32` (the router's matmul in fp32) then meets a bf16
    weight and fails ("expected m1 and m2 to have the same dtype"). Sharding the routers first, with an fp32 policy,
    keeps them out of their layer's unit (accelerate skips modules that are already FSDP2 units).
    Must run before the trainer prepares the model, on every rank.
    """
    if not (trainer.is_fsdp_enabled and recipe.moe.router_fp32 and (trainer.args.bf16 or trainer.args.fp16)):
        return
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moetune.architectures import find_moe_layers

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in find_moe_layers(trainer.model):
        fully_shard(layer.router, mp_policy=fp32, reshard_after_forward=True)


def load_distributed_config(recipe: Recipe):
    """transformers' DistributedConfig for `distributed.expert_parallel` > 1 (experts sharded at load), else None."""
    if recipe.distributed.expert_parallel == 1:
        return None
    from moetune.expert_parallel import distributed_config
    from moetune.loading import read_config

    # The model's config (expert count, EP plan) is checked again here: check_recipe reads only local models.
    config = read_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    return distributed_config(recipe, world_size(), config)


def needs_cpu_fsdp_shim(recipe: Recipe, environ: Mapping[str, str] = os.environ) -> bool:
    """FSDP2 on CPU ranks: accelerate needs moetune.cpu_fsdp to run it (instead of DDP)."""
    import torch

    return resolved_strategy(recipe, environ) == "fsdp2" and not torch.cuda.is_available()


def sum_across_ranks(tensors: list) -> list:
    """Element-wise sums over every rank of same-shaped lists of tensors (one all-reduce); the list itself when
    there is one process. Every rank must call it at the same point."""
    import torch
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    # nccl reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat)
    return [part.reshape(t.shape) for part, t in zip(flat.cpu().split([t.numel() for t in tensors]), tensors)]
