"""Routing telemetry: where tokens go, per MoE layer, while training or on a fixed model.

Per layer: the share of routed slots each expert gets (sums to 1), the share of tokens whose first choice it is,
mean router entropy, imbalance (max/mean share and coefficient of variation) and dead experts (no slot at all).
Padding tokens never count. A layer "collapses" when one expert takes more than `collapse_share` of the routed
slots or of the first choices (for top-k > 1 a single expert can hold at most 1/k of the slots, so the first-choice
share is what reveals a collapse there), or when experts that were alive in the first interval get no tokens.
The report is written (routing.json/png) and shown by `moetune.routing_report`.
"""

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from moetune.architectures import describe_moe
from moetune.router_capture import RouterCapture
from moetune.router_losses import router_probabilities
from moetune.routing_report import write_routing_report


logger = logging.getLogger(__name__)


class _Counts:
    """Accumulated routing counts of one layer."""

    def __init__(self, num_experts: int):
        self.slots = torch.zeros(num_experts, dtype=torch.float64)
        self.first = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.tokens = 0.0

    def add(self, probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None:
            probs, chosen = probs[mask], chosen[mask]
        n = self.slots.numel()
        self.slots += torch.bincount(chosen.reshape(-1).cpu(), minlength=n)[:n].double()
        self.first += torch.bincount(probs.argmax(dim=-1).cpu(), minlength=n)[:n].double()
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1)
        self.entropy_sum += float(entropy.sum())
        self.tokens += probs.shape[0]

    def summary(self, layer: int) -> dict[str, Any]:
        n = self.slots.numel()
        share = self.slots / self.slots.sum().clamp_min(1.0)
        first = self.first / self.first.sum().clamp_min(1.0)
        mean = 1.0 / n
        return {
            "layer": layer,
            "tokens": int(self.tokens),
            "share": [round(float(x), 6) for x in share],
            "first_choice_share": [round(float(x), 6) for x in first],
            "entropy": self.entropy_sum / max(self.tokens, 1.0),
            "normalized_entropy": self.entropy_sum / max(self.tokens, 1.0) / math.log(n) if n > 1 else 0.0,
            "max_over_mean": float(share.max()) / mean,
            "cv": float(share.std(unbiased=False)) / mean,
            "dead_experts": [i for i in range(n) if self.slots[i] == 0],
        }


class RoutingTelemetry(TrainerCallback):
    """Routing statistics of a MoE model, as a `TrainerCallback` or on its own.

    On its own::

        with RoutingTelemetry.attach(model) as telemetry:
            model(**batch)
        report = telemetry.report()

    As a callback it binds to the trainer's model at train start, adds `routing/*` metrics at every logging step,
    warns (logging.warning, also recorded in the report) when a layer collapses, and writes `routing.json` and
    `routing.png` to `args.output_dir` at train end. `MoETrainer` shares its own `RouterCapture` with it.

    Args:
        collapse_share: a layer collapses when one expert gets more than this share of slots or first choices.
        training_only: count only forwards in training mode (evaluation forwards are skipped).
    """

    def __init__(self, *, collapse_share: float = 0.5, training_only: bool = True):
        self.collapse_share = collapse_share
        self.training_only = training_only
        self.capture: RouterCapture | None = None
        self._owns_capture = False
        self.info = None
        self.total: dict[int, _Counts] = {}
        self.interval: dict[int, _Counts] = {}
        self.alive_at_start: dict[int, set[int]] = {}
        self.history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._warned: set[tuple[int, str, int]] = set()
        self.managed_by_trainer = False

    # -- binding -------------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module, capture: RouterCapture | None = None) -> "RoutingTelemetry":
        """Start recording `model`'s routing (with `capture`'s hooks, or hooks of its own)."""
        if self.capture is not None:
            return self
        self.info = describe_moe(model)
        self._owns_capture = capture is None
        self.capture = capture if capture is not None else RouterCapture(model)
        self.capture.add_listener(self.observe)
        return self

    def unbind(self) -> None:
        if self.capture is not None and self._owns_capture:
            self.capture.remove()
        self.capture = None

    @classmethod
    @contextmanager
    def attach(cls, model: nn.Module, **kwargs: Any) -> Iterator["RoutingTelemetry"]:
        """Context manager: record the routing of every forward of `model` inside the block."""
        telemetry = cls(**kwargs).bind(model)
        try:
            yield telemetry
        finally:
            telemetry.unbind()

    # -- recording -----------------------------------------------------------------------------------------------
    def observe(self, capture: RouterCapture) -> None:
        """Add the routing of the capture's last forward (called by the capture after each forward)."""
        if not capture.layers or (self.training_only and not capture.layers[0].router.training):
            return
        layers, logits, chosen = capture.ordered()
        mask = capture.token_mask()
        with torch.no_grad():
            for layer, layer_logits, layer_chosen in zip(layers, logits, chosen):
                probs = router_probabilities(layer_logits.detach(), self.info.router_scoring)
                if layer_chosen is None:
                    layer_chosen = probs.topk(self.info.top_k, dim=-1).indices
                for store in (self.total, self.interval):
                    store.setdefault(layer, _Counts(self.info.num_experts)).add(probs, layer_chosen.detach(), mask)

    def log_metrics(self, step: int | None = None) -> dict[str, float]:
        """Summarize and reset the current interval; returns the `routing/*` metrics for the trackers."""
        if not self.interval:
            return {}
        summaries = [counts.summary(layer) for layer, counts in sorted(_summed(self.interval).items())]
        self.interval = {}
        if not self.alive_at_start:
            self.alive_at_start = {s["layer"]: set(range(self.info.num_experts)) - set(s["dead_experts"]) for s in summaries}
        self._check(summaries)
        self.history.append({"step": step, "layers": summaries})
        return {
            "routing/max_share": max(max(s["share"]) for s in summaries),
            "routing/max_over_mean": max(s["max_over_mean"] for s in summaries),
            "routing/cv": sum(s["cv"] for s in summaries) / len(summaries),
            "routing/entropy": sum(s["normalized_entropy"] for s in summaries) / len(summaries),
            "routing/dead_experts": float(sum(len(s["dead_experts"]) for s in summaries)),
        }

    def _check(self, summaries: list[dict[str, Any]]) -> None:
        for s in summaries:
            layer = s["layer"]
            for kind, shares in (("routed slots", s["share"]), ("first choices", s["first_choice_share"])):
                top = max(range(len(shares)), key=shares.__getitem__)
                if shares[top] > self.collapse_share:
                    self._warn((layer, kind, top), f"routing collapse in layer {layer}: expert {top} gets "
                               f"{shares[top]:.0%} of the {kind} (threshold {self.collapse_share:.0%})")
            died = sorted(self.alive_at_start.get(layer, set()) & set(s["dead_experts"]))
            for expert in died:
                self._warn((layer, "died", expert), f"dead expert in layer {layer}: expert {expert} was routed "
                           "tokens at the start but got none in the last interval")

    def _warn(self, key: tuple[int, str, int], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warnings.append(message)
            logger.warning(message)

    def report(self) -> dict[str, Any]:
        """Whole-run statistics per layer, the logging-step history and every warning, as a JSON-able dict."""
        if self.interval:  # fold a pending interval into the history so its collapse checks run too
            self.log_metrics(step=None)
        layers = [counts.summary(layer) for layer, counts in sorted(_summed(self.total).items())]
        self._check(layers)
        info = self.info
        return {
            "model_type": info.model_type if info else None,
            "num_experts": info.num_experts if info else None,
            "top_k": info.top_k if info else None,
            "router_scoring": info.router_scoring if info else None,
            "collapse_share": self.collapse_share,
            "tokens": max((s["tokens"] for s in layers), default=0),
            "layers": layers,
            "history": self.history,
            "warnings": list(self.warnings),
        }

    # -- TrainerCallback -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.capture is None and model is not None:
            self.bind(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.managed_by_trainer and logs is not None and "loss" in logs:
            logs.update(self.log_metrics(step=state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.total:
            report = self.report()  # on every rank: it sums the ranks' counts
            if state.is_world_process_zero:
                write_routing_report(report, args.output_dir)


def _summed(counts: dict[int, _Counts]) -> dict[int, _Counts]:
    """Every rank's counts summed (a copy): the statistics describe all the tokens trained on, not rank 0's share.
    Every rank must call it at the same point; on one process it returns `counts` as they are."""
    from moetune.distributed import sum_across_ranks

    layers = sorted(counts)
    rows = [torch.cat([counts[k].slots, counts[k].first, torch.tensor([counts[k].entropy_sum, counts[k].tokens],
                                                                       dtype=torch.float64)]) for k in layers]
    summed_rows = sum_across_ranks(rows)
    if summed_rows is rows:
        return counts
    summed = {}
    for layer, row in zip(layers, summed_rows):
        n = counts[layer].slots.numel()
        summed[layer] = total = _Counts(n)
        total.slots, total.first = row[:n], row[n:2 * n]
        total.entropy_sum, total.tokens = float(row[2 * n]), float(row[2 * n + 1])
    return summed


def _batches(tokenizer, data: Iterable, batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches from texts, token-id lists, or rows with `input_ids` (a tokenized datasets.Dataset)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    for item in data:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        elif isinstance(item, dict):
            ids = item["input_ids"]
        else:
            ids = item
        rows.append(list(ids)[:max_length])
        if len(rows) == batch_size:
            yield _pad(rows, pad_id)
            rows = []
    if rows:
        yield _pad(rows, pad_id)


def _pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def measure_routing(model: nn.Module, tokenizer, batches_or_texts: Iterable, *, batch_size: int = 8,
                    max_length: int = 512, collapse_share: float = 0.5) -> dict[str, Any]:
    """Routing report of `model` on some data, without training (eval mode, no gradients).

    Args:
        model: a MoE causal LM (plain, PEFT-wrapped or 4-bit).
        tokenizer: its tokenizer (used for texts and for the pad id).
        batches_or_texts: texts, lists of token ids, rows with `input_ids` (e.g. a tokenized Dataset), or ready
            batches (dicts of tensors with `input_ids` and optionally `attention_mask`).
        batch_size: rows per forward when rows are given.
        max_length: rows are cut to this many tokens.
        collapse_share: see `RoutingTelemetry`.

    Returns:
        The report dict (`RoutingTelemetry.report()`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = list(batches_or_texts)
    ready = bool(items) and isinstance(items[0], dict) and isinstance(items[0].get("input_ids"), torch.Tensor)
    batches = items if ready else _batches(tokenizer, items, batch_size, max_length)
    try:
        with RoutingTelemetry.attach(model, collapse_share=collapse_share, training_only=False) as telemetry:
            with torch.no_grad():
                for batch in batches:
                    model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
            return telemetry.report()
    finally:
        model.train(was_training)


def routing_from_paths(model_path: str, data_path: str, *, max_examples: int = 256, max_length: int = 512,
                       batch_size: int = 8) -> dict[str, Any]:
    """`moetune routing MODEL DATA`: load the model (a run dir: base + what training left) and the data the moetune
    way, then `measure_routing`."""
    from moetune.config import DataSection
    from moetune.data import load_datasets
    from moetune.expert_scores import score_experts
    from moetune.inference import load_for_inference

    model, tokenizer = load_for_inference(model_path)
    data = load_datasets(DataSection(train=data_path, max_length=max_length), tokenizer)
    rows = data.train.select(range(min(max_examples, len(data.train))))
    report = measure_routing(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    add_expert_scores(report, score_experts(model, rows, tokenizer=tokenizer, max_tokens=10**12,
                                            batch_size=batch_size, max_length=max_length))
    return report


def add_expert_scores(report: dict[str, Any], scores) -> None:
    """Put each layer's token share, gate mass and REAP (`moetune.expert_scores`) under `scores` in the report."""
    for layer in report["layers"]:
        if layer["layer"] in scores.token_share:
            layer["scores"] = scores.layer_dict(layer["layer"])
