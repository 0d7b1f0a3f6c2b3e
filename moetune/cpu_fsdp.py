"""FSDP2 on CPU ranks (gloo): the one accelerate check that stands in its way, lifted for pinned versions only.

Why this exists: `AcceleratorState.__init__` turns a launch into FSDP only when its base type is a GPU-like
`MULTI_*` (MULTI_GPU, MULTI_XPU, ...); MULTI_CPU is left out of that list, so on CPU ranks an FSDP plugin is
dropped and the run silently trains as DDP (docs/upstream.md#accelerate-fsdp2-cpu). Nothing else in the path needs a GPU:
torch's `fully_shard` runs on a CPU device mesh over gloo, and accelerate's `fsdp2_prepare_model`, its
FULL_STATE_DICT saving and loading and transformers' Trainer work unchanged once the state says FSDP (measured on 2 CPU ranks, LoRA and full
fine-tuning, resume and the consolidated save: tests/test_distributed_fsdp.py). So moetune repeats the skipped branch for MULTI_CPU (the same three assignments
accelerate makes for GPUs) and nothing more.

The patch is scoped (a context manager that restores the original) and gated to the accelerate versions it was
verified with; on any other version `strategy: fsdp2` on CPU ranks is an error, never a silent DDP run. Delete it
when accelerate accepts MULTI_CPU in that branch (the test `test_cpu_fsdp_shim_still_needed` says so).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from moetune.errors import MoetuneError


# accelerate versions whose `AcceleratorState.__init__` was read and run under this shim (2 CPU ranks, gloo).
VERIFIED_ACCELERATE = ("1.15.0",)


def check_supported() -> None:
    """Raise `MoetuneError` when the installed accelerate is not one this shim was verified with."""
    import accelerate

    if accelerate.__version__ not in VERIFIED_ACCELERATE:
        raise MoetuneError(
            f"`distributed.strategy: fsdp2` on CPU ranks needs moetune's accelerate shim, verified only with "
            f"accelerate {', '.join(VERIFIED_ACCELERATE)} (installed: {accelerate.__version__}); on another version "
            "the run would silently train as DDP. Install a verified accelerate, use `distributed.strategy: ddp`, "
            "or run FSDP2 on GPUs"
        )


@contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """While active, an `Accelerator` created on MULTI_CPU ranks with an FSDP plugin really runs FSDP.

    Only the accelerator's creation needs it: the state is a process-wide singleton once set.
    """
    check_supported()
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
             *args, **kwargs):
        was_initialized = bool(AcceleratorState._shared_state)
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if was_initialized or fsdp_plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        # accelerate 1.15 state.py, the MULTI_GPU branch of AcceleratorState.__init__:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
