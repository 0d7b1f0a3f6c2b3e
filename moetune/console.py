"""What a training run prints: one compact line per logging step, one progress bar, and no third-party noise.

`moetune.progress.StepPrinter` replaces the Trainer's `ProgressCallback` / `PrinterCallback` (which print the raw log dict). Only
the main process prints. The progress bar (with ETA) is drawn only on a terminal; in a log file each step line
carries the ETA instead, so the file holds no bar fragments. `quiet_third_party()` is for moetune's entry points
(the CLI): it silences warnings and bars that do not apply to a moetune run. The metrics are documented in
docs/metrics.md. Nothing here imports torch or transformers (`moetune validate --schema-only` stays instant).
"""

import logging
import os
import sys
import warnings


_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """`-q`: no step lines, no bar, no reports; warnings, errors and the final summary only."""
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_third_party(verbose: bool = False) -> None:
    """Silence, at their source, the messages of other libraries that do not apply to a moetune run.

    * bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" on
      every import: the CPU 4-bit matmul then falls back to dequantize + matmul, which is what moetune expects.
    * DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
      when anything imports it on a machine without a GPU (transformers and accelerate do, for their integrations),
      also in runs that do not use DeepSpeed.
    * transformers' "Loading weights" / "Writing model shards" bars: one fragment line each in a log file.
    * FutureWarnings raised inside moetune's own calls into the libraries (we pin their versions and follow
      their changes in docs/upstream.md).
    With `verbose` (-v) everything stays on.
    """
    if verbose:
        return
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("gemm_4bit_forward from kernels-community"))
    logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))
    # Read by huggingface_hub when first imported, and transformers' bars follow it; if already imported, directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate|datasets)\b")


def format_step(logs: dict, state, *, tokens_per_s: float | None = None, eta_s: float | None = None) -> str | None:
    """One line for a Trainer log dict (None for the end-of-training dict: the summary reports it)."""
    if "train_loss" in logs:  # (every log has train_runtime when the Trainer counts input tokens)
        return None
    step = f"step {state.global_step}/{state.max_steps}"
    if "eval_loss" in logs:
        parts = [f"eval {step}", f"eval_loss {logs['eval_loss']:.4f}"]
        parts += [f"{name.removeprefix('eval_')} {logs[name]:.4g}" for name in ("eval_aux_loss", "eval_z_loss") if name in logs]
        return "  ".join(parts)
    parts = [step + (f" ({_clock(eta_s)} left)" if eta_s is not None else "")]
    for name, label, fmt in (("loss", "loss", ".4f"), ("aux_loss", "aux", ".3f"), ("z_loss", "z", ".3f"),
                             ("grad_norm", "grad", ".3g"), ("learning_rate", "lr", ".2e")):
        if logs.get(name) is not None:
            parts.append(f"{label} {logs[name]:{fmt}}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if "routing/max_over_mean" in logs:
        parts.append(f"routing max/mean {logs['routing/max_over_mean']:.2f} cv {logs['routing/cv']:.2f} "
                     f"entropy {logs['routing/entropy']:.2f} dead {int(logs['routing/dead_experts'])}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
