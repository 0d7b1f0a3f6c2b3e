"""Resumable checkpoints for models sharded at load time (`distributed.expert_parallel > 1`).

transformers 5.23's Trainer refuses to write the optimizer state of a model sharded by `DistributedConfig`: its
__init__ raises unless `save_only_model=True`, and with that flag `_save_checkpoint` skips the optimizer, the
scheduler and the RNG states (docs/upstream.md#expert-parallel). moetune keeps `save_only_model=True` (so the guard
passes and the consolidated model is still written) and adds, next to it, what a resume needs:

- `ep_state/`: model and optimizer state through `torch.distributed.checkpoint` (each rank writes its own DTensor
  shards: experts on the EP mesh, the rest FSDP2), so nothing is gathered onto one rank;
- `scheduler.pt` (main rank) and `rng_state_<rank>.pth` (every rank, Trainer's own format and loader).

On resume the weights come from `ep_state/` too, shard by shard: the consolidated `model.safetensors` holds full
tensors, for loading on one process; Trainer would copy them into the DTensor parameters with `load_state_dict`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


STATE_DIR = "ep_state"
SCHEDULER_NAME = "scheduler.pt"  # transformers' name; `_load_optimizer_and_scheduler` ignores it without optimizer.pt


def _optimizer(trainer):
    # accelerate's AcceleratedOptimizer wraps the torch optimizer; DCP's helpers need the torch one.
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def has_state(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / STATE_DIR / ".metadata").is_file()


def save(trainer, output_dir: str | os.PathLike) -> None:
    """Write model + optimizer (DCP, all ranks), scheduler (main rank) and every rank's RNG state into `output_dir`.

    Collective: every rank must call it. DCP's coordinator (rank 0) writes `ep_state/.metadata` last, after every
    rank's shards, so when this returns on rank 0 the whole checkpoint is on disk.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer._save_rng_state(str(output_dir))  # rng_state_<rank>.pth, read back by Trainer's own `_load_rng_state`
    if trainer.args.should_save:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "please also save the optimizer" reminder
            torch.save(trainer.lr_scheduler.state_dict(), output_dir / SCHEDULER_NAME)
    model_state, optim_state = get_state_dict(trainer.model, _optimizer(trainer))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(output_dir / STATE_DIR))


def load(trainer, checkpoint: str | os.PathLike) -> None:
    """Load what `save` wrote into the trainer's model, optimizer and scheduler (after the optimizer exists).

    The RNG states are not touched here: Trainer's `_load_rng_state` restores them at the step it resumes from.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    optimizer = _optimizer(trainer)
    # get_state_dict on a fresh optimizer creates its state (one step at lr 0), so DCP has tensors to load into.
    model_state, optim_state = get_state_dict(trainer.model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(checkpoint / STATE_DIR))
    set_state_dict(trainer.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.lr_scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_NAME, weights_only=True))
