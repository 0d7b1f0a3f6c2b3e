"""`MoETrainer`: TRL's SFTTrainer plus router losses, router controls and routing telemetry.

TRL's own aux-loss path is switched off: on its fused LM-head forward it recomputes Mixtral's softmax loss for every
family and crashes on DeepSeek-V3 / GLM-4 (docs/upstream.md#trl-fused-aux-loss). Instead, forward hooks on the routers (`RouterCapture`)
record the logits and the chosen experts, and the aux loss follows each family's own scoring (`describe_moe`), with
the recipe's coefficient for every family, padding excluded. The LM loss stays TRL's.
"""

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer

from moetune import ep_checkpoint
from moetune.architectures import describe_moe
from moetune.config import MoESection
from moetune.errors import MoetuneError, TrainingDiverged
from moetune.resume_schedule import follow_recipe_schedule
from moetune.router_capture import RouterCapture
from moetune.router_controls import apply_router_controls
from moetune.run_dir import RunDir, mark_checkpoint_complete
from moetune.telemetry import RoutingTelemetry


logger = logging.getLogger(__name__)


def _full(norm: torch.Tensor) -> torch.Tensor:
    # Expert parallelism: expert and non-expert weights are DTensors on different meshes, which torch.stack
    # refuses to mix; the reduced norm is a plain number on every rank.
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class MoETrainer(SFTTrainer):
    """SFTTrainer for sparse MoE models.

    Adds `moe.aux_loss_coef * aux + moe.z_loss_coef * z` to the training loss, scaled for gradient accumulation the
    way `Trainer.training_step` scales the LM loss, and logs `aux_loss` and `z_loss` apart from `loss`. Applies the
    router controls (jitter, fp32 router, expert dropout) and, with `moe.telemetry`, adds `RoutingTelemetry`.

    Args:
        *args, **kwargs: as for `trl.SFTTrainer`.
        moe: the recipe's `moe` section (defaults when None).

    After training, `router_loss_means()` gives the run's mean `aux_loss` / `z_loss` (for metrics.json) and
    `telemetry` holds the routing telemetry (or None).
    """

    def __init__(self, *args: Any, moe: MoESection | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.moe = moe if moe is not None else MoESection()
        # TRL's aux path off (see module docstring); the model must not add its own aux loss either.
        self.aux_loss_enabled = False
        text_config = self.model.config.get_text_config()
        if hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = False
        self.moe_info = describe_moe(self.model)
        self.aux_coef = self._aux_coef()
        self.router_controls = apply_router_controls(self.model, self.moe)
        self.router_capture = RouterCapture(self.model)
        self.telemetry: RoutingTelemetry | None = None
        if self.moe.telemetry:
            self.telemetry = RoutingTelemetry().bind(self.model, self.router_capture)
            self.telemetry.managed_by_trainer = True  # MoETrainer.log adds its metrics; on_train_end writes the files
            self.add_callback(self.telemetry)
        self._sums = {"aux_loss": 0.0, "z_loss": 0.0}
        self._count = 0

    def _aux_coef(self) -> float:
        """The recipe's coefficient, else the model's own live one (0.001 where the family has none)."""
        if not self.moe.aux_loss:
            return 0.0
        if self.moe.aux_loss_coef is not None:
            return self.moe.aux_loss_coef
        # The architecture map knows which *ForCausalLM attribute holds it (dbrx: from ffn_config.moe_loss_weight,
        # jetmoe: aux_loss_coef); PEFT wrappers forward the attribute.
        attr = self.moe_info.aux_coef_attr
        value = getattr(self.model, attr, None) if attr is not None else None
        return float(value) if value is not None else 0.001

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Mirrors `Trainer.training_step`: True when it will NOT divide the returned loss by the GA steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        mode = "train" if self.model.training else "eval"
        aux, z = self.router_capture.losses(self.moe_info.num_experts, self.moe_info.top_k, self.moe_info.router_scoring)
        self.router_capture.clear()
        if mode == "train":
            extra = torch.zeros((), device=loss.device)
            if self.aux_coef > 0:
                extra = extra + self.aux_coef * aux.to(loss.device)
            if self.moe.z_loss_coef > 0:
                extra = extra + self.moe.z_loss_coef * z.to(loss.device)
            # Per-micro-batch means: averaged over the accumulation steps like the LM loss.
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra.to(loss.dtype)
        # One gather and one host sync per micro-batch for the three values (this runs on every step); every rank
        # sees the same numbers, so every rank stops together on a non-finite loss.
        values = [loss.detach().float(), aux.detach().float().to(loss.device), z.detach().float().to(loss.device)]
        loss_value, aux_value, z_value = self.accelerator.gather_for_metrics(
            torch.stack(values).reshape(1, 3)).mean(0).tolist()
        if mode == "train" and not math.isfinite(loss_value):
            self._diverged("loss", loss_value, f"aux_loss={aux_value:.4g}, z_loss={z_value:.4g}")
        if mode == "train":
            self._sums["aux_loss"] += aux_value
            self._sums["z_loss"] += z_value
            self._count += 1
        self._metrics[mode]["aux_loss"].append(aux_value)
        self._metrics[mode]["z_loss"].append(z_value)
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------- divergence

    def _get_grad_norm(self, model, grad_norm=None):
        # Runs after clipping and before `optimizer.step()`: a non-finite norm stops here, so the weights never
        # take a NaN update (clipping by a NaN norm would write NaN into every trained weight).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            self._diverged("gradient norm", float(grad_norm), "before the optimizer step, so no weight was changed")
        return grad_norm

    def _diverged(self, what: str, value: float, detail: str) -> None:
        step = self.state.global_step + 1
        checkpoint, _ = RunDir(self.args.output_dir).last_complete_checkpoint()
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        raise TrainingDiverged(
            f"training diverged at step {step}: the {what} is {value} ({detail}). Nothing was saved as the final "
            f"model; {last}. Try a lower train.learning_rate, train.max_grad_norm (e.g. 1.0), smaller "
            "moe.aux_loss_coef / moe.z_loss_coef, or model.dtype: float32 / bfloat16 instead of float16; then "
            "start again (or --resume from the checkpoint)"
        )

    def check_weights_finite(self, where: str) -> None:
        """Raise `TrainingDiverged` if a trained weight holds NaN or inf (checked before anything is saved)."""
        trained = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not trained:
            return
        # ZeRO-3 holds only this rank's partition (`ds_tensor`; the parameter itself is an empty placeholder):
        # sum the partitions' norms over ranks, so a NaN anywhere reaches every rank and all stop together.
        zero3 = any(hasattr(p, "ds_tensor") for _, p in trained)
        norms = torch.stack([_full(torch.linalg.vector_norm(getattr(p, "ds_tensor", p).detach().float()))
                             for _, p in trained])
        if zero3:
            torch.distributed.all_reduce(norms)
        bad = [name for (name, _), ok in zip(trained, torch.isfinite(norms).tolist()) if not ok]
        if bad:
            self._diverged("weights", float("nan"), f"{len(bad)} trained tensor(s) non-finite before the {where} "
                           f"was written, e.g. {bad[0]}")

    # ----------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        self.check_weights_finite("checkpoint")
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.is_distributed_loading_by_transformers:
            # Expert parallelism: Trainer writes the weights only (save_only_model); add the optimizer, scheduler
            # and RNG states itself (moetune/ep_checkpoint.py, docs/upstream.md#expert-parallel).
            ep_checkpoint.save(self, folder)
        if self.args.should_save:  # written last: `--resume` takes only checkpoints that carry it
            mark_checkpoint_complete(folder)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # transformers 5.23 writes v5 MoE models in the per-expert checkpoint layout (experts.N.w1, for serving
        # engines) but `Trainer._load_from_checkpoint` reads checkpoints back without the weight conversion, so a
        # resumed full fine-tune silently kept its pre-resume expert and router weights (docs/upstream.md#trainer-resume). Checkpoints are therefore written in the runtime (fused) layout, which reloads key
        # for key; the final model keeps transformers' default layout.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        is_checkpoint = output_dir is not None and re.fullmatch(r"checkpoint-\d+", Path(output_dir).name)
        if not is_checkpoint or not hasattr(model, "save_pretrained") or hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        original = model.save_pretrained

        def save_fused(*args, **kwargs):
            return original(*args, **{**kwargs, "save_original_format": False})

        model.save_pretrained = save_fused
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Expert parallelism: ep_state/ holds the sharded (DTensor) weights as they were, in the layout the model
        # trains in; the consolidated model.safetensors (full tensors) is for loading on one process.
        if self.is_distributed_loading_by_transformers:
            if not ep_checkpoint.has_state(resume_from_checkpoint):
                raise MoetuneError(
                    f"{resume_from_checkpoint} holds the weights only (written by an older moetune, which could not "
                    "checkpoint the optimizer of an expert-parallel run), so resuming from it would restart the "
                    "optimizer and schedule; start the run again instead of --resume"
                )
            return  # the sharded weights come from ep_state/ with the optimizer (`_load_optimizer_and_scheduler`)
        # PEFT's `load_adapter` upcasts adapter weights to fp32, while TRL trains LoRA in bf16 on a 4-bit base: keep
        # the dtypes training ran in, or the resumed run would continue in another precision than it started.
        model = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        for name, param in model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.is_distributed_loading_by_transformers and ep_checkpoint.has_state(checkpoint):
            ep_checkpoint.load(self, checkpoint)  # RNG: Trainer's `_load_rng_state` reads rng_state_<rank>.pth
        else:
            if checkpoint is not None and not self.is_deepspeed_enabled and not _has_optimizer_state(Path(checkpoint)):
                # Trainer would skip the optimizer and scheduler without a word: the resumed run would restart
                # AdamW's moments and the learning-rate schedule from scratch, a different training than the one
                # resumed.
                raise MoetuneError(_no_optimizer_state_message(Path(checkpoint)))
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            changed = follow_recipe_schedule(self.optimizer, self.lr_scheduler, self.args.learning_rate)
            if changed is not None and self.is_world_process_zero():
                logger.warning(
                    "--resume: the learning rate follows this recipe's schedule (train.learning_rate %g, %s over "
                    "%d steps) from step %d on: the next step trains at %.3g, where the checkpoint's optimizer was "
                    "at %.3g (the run was planned with another length or learning rate)",
                    self.args.learning_rate, getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type),
                    self.state.max_steps, self.state.global_step, changed[1], changed[0])

    def _issue_warnings_after_load(self, load_result) -> None:
        # Upstream only warns about missing keys on resume; a missing key here means a weight silently keeps its
        # pre-resume value, which is wrong training. Tied weights are the one legitimate absence.
        base = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(base, "_tied_weights_keys", None) or {}) | set(getattr(base, "_keys_to_ignore_on_save", None) or [])
        missing = [k for k in load_result.missing_keys if k not in tied]
        if missing:
            raise MoetuneError(
                f"the checkpoint does not hold {len(missing)} weight(s) of this model (e.g. {missing[0]}), so resuming "
                "would train on with stale values. It was probably written in the per-expert layout by another tool "
                "or an older moetune; start the run again instead of --resume"
            )
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.telemetry is not None and self.model.training and "loss" in logs:
            logs.update(self.telemetry.log_metrics(step=self.state.global_step))
        super().log(logs, start_time)

    def router_loss_means(self) -> dict[str, float]:
        """Mean unweighted `aux_loss` and `z_loss` over all training micro-batches so far."""
        if self._count == 0:
            return {}
        return {key: value / self._count for key, value in self._sums.items()}


def _has_optimizer_state(checkpoint: Path) -> bool:
    """What transformers' `_load_optimizer_and_scheduler` needs to load anything: an optimizer file (or FSDP's
    optimizer folder) and the scheduler."""
    optimizer = (checkpoint / "optimizer.pt").is_file() or (checkpoint / "optimizer.bin").is_file() or any(
        p.is_dir() and "optimizer" in p.name for p in checkpoint.iterdir())
    return optimizer and (checkpoint / "scheduler.pt").is_file()


def _no_optimizer_state_message(checkpoint: Path) -> str:
    if ep_checkpoint.has_state(checkpoint):
        return (f"{checkpoint} was written by an expert-parallel run (`distributed.expert_parallel` > 1: its optimizer "
                f"state is in {ep_checkpoint.STATE_DIR}/), but this run does not shard the experts; resume it with the "
                "same `distributed.expert_parallel` and number of processes it was trained with")
    return (f"{checkpoint} holds no optimizer or scheduler state (written with `train.save_only_model: true`?), so "
            "--resume would restart the optimizer and the learning-rate schedule from scratch; resume from a "
            "checkpoint written without save_only_model, or start a new run")
