"""`MoETrainer`: TRL's SFTTrainer plus router losses, router controls and routing telemetry.

TRL's own aux-loss path is switched off: on its fused LM-head forward it recomputes Mixtral's softmax loss for every
family and crashes on DeepSeek-V3 / GLM-4 (STACK.md §5). Instead, forward hooks on the routers (`RouterCapture`)
record the logits and the chosen experts, and the aux loss follows each family's own scoring (`describe_moe`), with
the recipe's coefficient for every family, padding excluded. The LM loss stays TRL's.
"""

import logging
from typing import Any

import torch
from trl import SFTTrainer

from moetune.architectures import describe_moe
from moetune.config import MoESection
from moetune.router_capture import RouterCapture
from moetune.router_controls import apply_router_controls
from moetune.telemetry import RoutingTelemetry


logger = logging.getLogger(__name__)


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
        # One gather and one host sync per micro-batch for both values (this runs on every step).
        aux_value, z_value = self.accelerator.gather_for_metrics(
            torch.stack([aux.detach().float(), z.detach().float()]).reshape(1, 2)).mean(0).tolist()
        if mode == "train":
            self._sums["aux_loss"] += aux_value
            self._sums["z_loss"] += z_value
            self._count += 1
        self._metrics[mode]["aux_loss"].append(aux_value)
        self._metrics[mode]["z_loss"].append(z_value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.telemetry is not None and self.model.training and "loss" in logs:
            logs.update(self.telemetry.log_metrics(step=self.state.global_step))
        super().log(logs, start_time)

    def router_loss_means(self) -> dict[str, float]:
        """Mean unweighted `aux_loss` and `z_loss` over all training micro-batches so far."""
        if self._count == 0:
            return {}
        return {key: value / self._count for key, value in self._sums.items()}
