"""What actually runs, said in one line at start, and an error when it is not what the launcher asked for.

accelerate falls back silently on CPU: `--use_fsdp` and `--use_deepspeed` under `ACCELERATE_USE_CPU=true` run plain
DDP, and processes started without a backend train as unrelated single-process runs, all exiting 0 with
right-looking losses (docs/upstream.md#accelerate-cpu). moetune compares what the launcher asked for (the
environment accelerate and torchrun set) with the state the trainer's `Accelerator` ended up in.
"""

import os

from moetune.errors import MoetuneError


# What the launcher asks for: accelerate's own environment flags.
_REQUESTED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
_CPU_HINT = (
    "On CPU ranks only DDP runs through accelerate (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
    "--num_processes N -m moetune train RECIPE`); FSDP and DeepSpeed need GPUs"
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def describe_launch(accelerator) -> str:
    """One line: distributed type, world size, backend, how parameters (and experts) are held.

    Takes the trainer's `Accelerator`: only its state knows FSDP / DeepSpeed (a bare `PartialState` says MULTI_GPU).
    """
    state = accelerator.state
    kind = state.distributed_type.name if hasattr(state.distributed_type, "name") else str(state.distributed_type)
    backend = getattr(state, "backend", None) or "none"
    sharding = {
        "NO": "one process",
        "MULTI_CPU": "parameters and experts replicated on every rank (DDP)",
        "MULTI_GPU": "parameters and experts replicated on every rank (DDP)",
        "FSDP": "parameters sharded (FSDP)",
        "DEEPSPEED": "parameters partitioned (DeepSpeed)",
    }.get(kind, kind)
    return f"distributed: {kind}, world size {state.num_processes}, backend {backend}, {sharding}"


def check_launch(accelerator, environ=os.environ) -> None:
    """Raise `MoetuneError` when the run is not what the launcher asked for (instead of a different run)."""
    state = accelerator.state
    kind = getattr(state.distributed_type, "name", str(state.distributed_type))
    for flag, wanted in _REQUESTED.items():
        if _truthy(environ.get(flag)) and kind != wanted:
            raise MoetuneError(
                f"the launcher asked for {wanted} ({flag}=true) but accelerate set up {kind} with "
                f"{state.num_processes} process(es): training would silently run as {kind}. {_CPU_HINT}"
            )
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise MoetuneError(
            f"{world} processes were launched (WORLD_SIZE={world}) but this one trains alone "
            f"(world size {state.num_processes}): they would be {world} unrelated runs. {_CPU_HINT}"
        )
