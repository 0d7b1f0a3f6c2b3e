"""What actually runs, said in one line at start, and an error when it is not what the launcher asked for.

accelerate falls back silently on CPU: `--use_fsdp` and `--use_deepspeed` under `ACCELERATE_USE_CPU=true` run plain
DDP (FSDP2 runs there only through moetune's shim, moetune/cpu_fsdp.py), and processes started without a backend
train as unrelated single-process runs, all exiting 0 with right-looking losses (docs/upstream.md#accelerate-cpu).
moetune compares what the launcher asked for (the environment accelerate and torchrun set) with the state the
trainer's `Accelerator` ended up in (`check_launch`, before training), and once the trainer has prepared the model,
reads how parameters and experts are really held from the wrapped model itself (`LaunchReport`).
"""

import os

from transformers import TrainerCallback

from moetune.distributed import launcher_engine, world_size
from moetune.errors import MoetuneError


_CPU_HINT = (
    "On CPU ranks DDP (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m moetune train "
    "RECIPE`), FSDP2 and DeepSpeed ZeRO-2/3 (`distributed.strategy: fsdp2|zero2|zero3` in the recipe, same launch) "
    "run; FSDP1 needs GPUs"
)


def _kind(state) -> str:
    return getattr(state.distributed_type, "name", str(state.distributed_type))


def describe_launch(accelerator, model=None) -> str:
    """One line: distributed type, world size, backend, how parameters and experts are held.

    Takes the trainer's `Accelerator` (only its state knows FSDP / DeepSpeed; a bare `PartialState` says MULTI_GPU)
    and, once prepared, the trainer's wrapped model, whose parameters say how they are really held.
    """
    state = accelerator.state
    kind = _kind(state)
    backend = getattr(state, "backend", None) or "none"
    head = f"distributed: {kind}, world size {state.num_processes}, backend {backend}"
    if model is None:
        return head
    if kind == "DEEPSPEED":  # ZeRO-3 leaves empty placeholders in the module: the engine's stage says it
        from moetune.deepspeed_setup import describe_sharding

        held = describe_sharding(model) or "parameters whole on every rank, optimizer state and gradients partitioned"
        return f"{head}, DeepSpeed ZeRO stage {state.deepspeed_plugin.zero_stage}: {held} ({type(model).__name__})"
    return f"{head}, {holding(model, state.num_processes)}"


def holding(model, world: int) -> str:
    """How `model` (as prepared by the trainer) holds its parameters and fused experts, read from the tensors."""
    from torch.distributed.tensor import DTensor

    wrapper = type(model).__name__
    params = list(model.named_parameters())
    sharded = [p for _, p in params if isinstance(p, DTensor)]
    experts = [(n, p) for n, p in params if _is_fused_expert(n, p)]
    if sharded:
        how = f"{len(sharded)} of {len(params)} parameter tensors sharded as DTensor over {world} ranks ({wrapper})"
    elif wrapper == "DistributedDataParallel":
        how = f"parameters replicated on every rank (DDP, {wrapper})"
    elif world == 1:
        how = "one process"
    else:
        how = f"parameters held whole on every rank ({wrapper})"
    if not experts:
        return how
    name, p = experts[0]
    total = p.shape[0]
    local = p.to_local().shape[0] if isinstance(p, DTensor) else total
    if local < total:
        return f"{how}; experts sharded over {total // local} ranks (E/{total // local} per rank: {local} of {total})"
    return f"{how}; experts whole on every rank ({total} of {total})"


def _is_fused_expert(name: str, param) -> bool:
    """A v5 fused expert weight: a 3-D [E, ...] parameter of an `experts` module (LoRA's base weight included)."""
    return param.dim() == 3 and ".experts." in f".{name}"


# What accelerate's state must say for each strategy moetune resolved (moetune.distributed.resolved_strategy).
_MULTI = ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_HPU")
# Expert parallelism: transformers shards the model at load; accelerate only sets up the process group (MULTI_*).
_STRATEGY_TYPES = {"ddp": _MULTI, "expert_parallel": _MULTI, "fsdp2": ("FSDP",),
                   "fsdp1": ("FSDP",), "zero2": ("DEEPSPEED",), "zero3": ("DEEPSPEED",), "deepspeed": ("DEEPSPEED",)}
# ("single", one process, is not checked: accelerate may still run one-process FSDP or DeepSpeed on a GPU.)


def check_launch(accelerator, environ=os.environ, strategy: str | None = None) -> None:
    """Raise `MoetuneError` when the run is not what the launcher (or the recipe's resolved `distributed.strategy`)
    asked for, instead of a different run."""
    state = accelerator.state
    kind = _kind(state)
    if strategy is not None and kind not in _STRATEGY_TYPES.get(strategy, (kind,)):
        raise MoetuneError(
            f"the recipe asks for `distributed.strategy: {strategy}` but accelerate set up {kind} with "
            f"{state.num_processes} process(es): training would silently run as {kind}. {_CPU_HINT}"
        )
    engine = launcher_engine(environ)  # what the launcher asked for: accelerate's own environment flags
    if engine is not None and kind != engine.upper():
        flag = f"ACCELERATE_USE_{engine.upper()}"
        raise MoetuneError(
            f"the launcher asked for {engine.upper()} ({flag}=true) but accelerate set up {kind} with "
            f"{state.num_processes} process(es): training would silently run as {kind}. {_CPU_HINT}"
        )
    world = world_size(environ)
    if world > 1 and state.num_processes != world:
        raise MoetuneError(
            f"{world} processes were launched (WORLD_SIZE={world}) but this one trains alone "
            f"(world size {state.num_processes}): they would be {world} unrelated runs. {_CPU_HINT}"
        )


def check_prepared(model, state) -> None:
    """Raise `MoetuneError` when the prepared model is not held the way the distributed type says."""
    from torch.distributed.tensor import DTensor

    kind = _kind(state)
    if kind == "FSDP" and not any(isinstance(p, DTensor) for p in model.parameters()):
        raise MoetuneError(f"accelerate reports FSDP but no parameter of the prepared {type(model).__name__} is "
                           f"sharded: training would silently run unsharded. {_CPU_HINT}")
    sharded_at_load = any(isinstance(p, DTensor) for p in model.parameters())  # expert parallelism (transformers)
    if kind.startswith("MULTI_") and type(model).__name__ != "DistributedDataParallel" and not sharded_at_load:
        raise MoetuneError(f"accelerate reports {kind} but the prepared model is a {type(model).__name__}, not "
                           "DistributedDataParallel: the ranks would train without syncing gradients")


class LaunchReport(TrainerCallback):
    """At train start (after the trainer prepared the model): check it, then say what runs, once.

    Args:
        trainer: the trainer whose `model_wrapped` is inspected.
        say: prints a line on the main process.
    """

    def __init__(self, trainer, say):
        self.trainer, self.say = trainer, say

    def on_train_begin(self, args, state, control, **kwargs):
        model, acc_state = self.trainer.model_wrapped, self.trainer.accelerator.state
        check_prepared(model, acc_state)
        self.say(describe_launch(self.trainer.accelerator, model))
