"""Routing telemetry: where tokens go, per MoE layer, while training or on a fixed model.

Per layer: the share of routed slots each expert gets (sums to 1), the share of tokens whose first choice it is,
mean router entropy, imbalance (max/mean share and coefficient of variation) and dead experts (no slot at all).
Padding tokens never count. A layer "collapses" when one expert takes more than `collapse_share` of the routed
slots or of the first choices (for top-k > 1 a single expert can hold at most 1/k of the slots, so the first-choice
share is what reveals a collapse there), or when experts that were alive in the first interval get no tokens.
"""

import json
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from moetune.architectures import describe_moe
from moetune.router_capture import RouterCapture
from moetune.router_losses import router_probabilities


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


def write_routing_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `routing.json` and `routing.png` (see `routing_figure`) into `out_dir`, and `expert_scores.png` when
    the report carries expert scores (`add_expert_scores`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "routing.json", out / "routing.png"
    json_path.write_text(json.dumps(report, indent=2))
    import matplotlib.pyplot as plt

    fig = routing_figure(report)
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    if any("scores" in layer for layer in report["layers"]):  # `moetune routing` adds expert scores: plot them beside it
        from moetune.expert_scores import scores_from_report, write_scores_plot

        write_scores_plot(scores_from_report(report), out / "expert_scores.png")
    return json_path, png_path


def routing_figure(report: dict[str, Any]):
    """The routing report as a matplotlib figure that explains itself.

    Heatmaps of the share of routed slots (layers x experts; each token sends top_k slots, one per chosen expert)
    on a diverging scale centred on the balanced share 1/E (white), values in the cells, dead experts crossed
    out. With a training history: the first and the last logging interval side by side, and the imbalance
    (max/mean share per layer) over the steps. Without one (`moetune routing`): the whole measurement and the
    imbalance per layer.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    num_experts = report.get("num_experts") or max((len(layer["share"]) for layer in report["layers"]), default=1)
    balanced = 1.0 / num_experts
    history = [h for h in report.get("history", []) if h.get("layers")]
    if len(history) >= 2:
        panels = [(f"first interval (step {history[0]['step']})", history[0]["layers"]),
                  (f"last interval (step {history[-1]['step'] if history[-1]['step'] is not None else 'end'})",
                   history[-1]["layers"])]
    else:
        panels = [(f"{report.get('tokens')} tokens", report["layers"])]
    n_layers = max(len(report["layers"]), 1)
    width = max(4.0, 0.45 * num_experts + 1.5)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(width * len(panels) + 5.0, max(3.2, 0.45 * n_layers + 2.2)),
                             layout="constrained", gridspec_kw={"width_ratios": [width] * len(panels) + [4.5]})
    top = max([balanced * 2] + [max(layer["share"]) for _, layers in panels for layer in layers])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top)
    image = None
    for ax, (title, layers) in zip(axes, panels):
        shares = [layer["share"] for layer in layers] or [[0.0] * num_experts]
        image = ax.imshow(shares, aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
        ax.set_title(title)
        for row, layer in enumerate(layers):
            for expert, share in enumerate(layer["share"]):
                if expert in layer["dead_experts"]:
                    ax.plot(expert, row, marker="x", color="yellow", markersize=14, markeredgewidth=3)
                    ax.text(expert, row + 0.3, "dead", ha="center", va="center", fontsize=8, color="yellow")
                elif num_experts <= 16:
                    ax.text(expert, row, f"{share:.0%}", ha="center", va="center", fontsize=8,
                            color="white" if abs(share - balanced) > 0.6 * (top - balanced) else "black")
    bar = fig.colorbar(image, ax=list(axes[: len(panels)]), location="bottom", shrink=0.8, aspect=40)
    bar.set_label("share of routed slots (white = balanced, 1/E)")
    bar.ax.axvline(balanced, color="black", linewidth=1.5)
    bar.set_ticks(sorted({0.0, balanced, top}), labels=["0", f"1/E = {balanced:.0%}", f"{top:.0%}"])
    imbalance = axes[-1]
    if len(history) >= 2:
        steps = [h["step"] if h["step"] is not None else i for i, h in enumerate(history)]
        for layer in report["layers"]:
            values = [next((s["max_over_mean"] for s in h["layers"] if s["layer"] == layer["layer"]), float("nan"))
                      for h in history]
            imbalance.plot(steps, values, marker=".", label=f"layer {layer['layer']}")
        imbalance.set_xlabel("training step")
        imbalance.set_title("imbalance over training\n(busiest expert's share / 1/E; 1 = balanced)", fontsize=10)
    else:
        layers = report["layers"]
        imbalance.bar([str(layer["layer"]) for layer in layers], [layer["max_over_mean"] for layer in layers])
        imbalance.set_xlabel("MoE layer")
        imbalance.set_title("imbalance per layer\n(busiest expert's share / 1/E; 1 = balanced)", fontsize=10)
    imbalance.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="balanced (1.0)")
    imbalance.set_ylabel("max/mean share")
    imbalance.set_ylim(bottom=0.0)
    if len(report["layers"]) <= 12 or len(history) < 2:
        imbalance.legend(fontsize=8, loc="lower right")
    dead = sum(len(layer["dead_experts"]) for layer in report["layers"])
    fig.suptitle(
        f"Where tokens go: {report.get('model_type')}, {num_experts} experts, top-{report.get('top_k')}. Each token is "
        f"routed to {report.get('top_k')} experts (its {report.get('top_k')} slots); a cell is the share of all slots "
        f"that expert got.\nBalanced = 1/E (white); red = busier, blue = idler"
        + (f"; yellow x = dead expert (no slot at all; {dead} in the run)" if dead else "; no dead experts"),
        fontsize=10)
    return fig


def format_routing_report(report: dict[str, Any]) -> str:
    """A terminal table: one row per MoE layer, then the warnings."""
    lines = [
        f"{report.get('model_type')}: {report.get('num_experts')} experts, top-{report.get('top_k')}, "
        f"{report.get('router_scoring')} routing, {report.get('tokens')} tokens",
        f"{'layer':>5}  {'max share':>9}  {'max/mean':>8}  {'CV':>6}  {'entropy':>7}  dead experts",
    ]
    for layer in report["layers"]:
        dead = ",".join(map(str, layer["dead_experts"])) or "-"
        lines.append(f"{layer['layer']:>5}  {max(layer['share']):>9.3f}  {layer['max_over_mean']:>8.2f}  "
                     f"{layer['cv']:>6.3f}  {layer['normalized_entropy']:>7.3f}  {dead}")
    lines += [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    return "\n".join(lines)


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
    """`moetune routing MODEL DATA`: load the model and the data the moetune way, then `measure_routing`."""
    from moetune.config import DataSection
    from moetune.data import load_datasets
    from moetune.expert_scores import score_experts
    from moetune.loading import load_model

    model, tokenizer = load_model(model_path)
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
