"""Expert scores from data: how much each routed expert of each MoE layer is used, and how much it matters.

Per MoE layer and expert, over a bounded sample of real (non-padding) tokens, no gradients:

* token share: the fraction of routed slots (token, top-k position) that went to the expert; sums to 1 per layer.
* gate mass: the routing weights the expert received, divided by all routing weights given out; sums to 1.
* REAP saliency (arXiv 2510.13999): the mean, over the tokens routed to expert j, of gate weight x L2 norm of
  expert j's output for that token. Experts that no token reached score 0.

The routing weights are the ones the experts module is really called with (`experts(hidden, top_k_index,
top_k_weights)`), so renormalized top-k, DeepSeek's bias-corrected group-limited choice and routed scaling factors are
all what the model does. REAP's per-expert outputs are *recomputed*: a pre-hook on the experts module calls the module
again for each expert on the tokens routed to it, with a top-1 route of weight 1. Calling the module itself (rather
than re-doing the math from the fused weights) keeps every layout right for free (gpt_oss' transposed, interleaved
weights with biases, dbrx's 2-D stacks, PEFT-wrapped or 4-bit experts) at the cost of one extra expert pass.
Families whose experts module is called differently (llama4's pre-scaled, repeated input) get token shares and gate
masses from the router logits instead, and no REAP.
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from moetune.architectures import describe_moe, find_moe_layers
from moetune.errors import MoetuneError
from moetune.router_capture import RouterCapture
from moetune.router_losses import router_probabilities


logger = logging.getLogger(__name__)

Score = Literal["tokens", "gate", "reap"]
SCORES: tuple[str, ...] = ("tokens", "gate", "reap")


@dataclass
class ExpertScores:
    """Scores of every routed expert, per MoE layer (lists indexed by expert id)."""

    model_type: str
    num_experts: int
    top_k: int
    tokens: int  # real tokens scored
    token_share: dict[int, list[float]] = field(default_factory=dict)
    gate_mass: dict[int, list[float]] = field(default_factory=dict)
    reap: dict[int, list[float]] | None = None  # None where the family's experts cannot be called per expert

    @property
    def layers(self) -> list[int]:
        return sorted(self.token_share)

    def get(self, score: str) -> dict[int, list[float]]:
        """The per-layer scores named `score` (tokens, gate or reap)."""
        if score == "tokens":
            return self.token_share
        if score == "gate":
            return self.gate_mass
        if score == "reap":
            if self.reap is None:
                raise MoetuneError(f"REAP scores are not available for {self.model_type!r}: its experts module is not "
                                   "called as experts(hidden, top_k_index, top_k_weights); use --score tokens or gate")
            return self.reap
        raise MoetuneError(f"unknown expert score {score!r}; choose one of: {', '.join(SCORES)}")

    def layer_dict(self, layer: int) -> dict[str, list[float]]:
        out = {"token_share": self.token_share[layer], "gate_mass": self.gate_mass[layer]}
        if self.reap is not None:
            out["reap"] = self.reap[layer]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens, "layers": {str(layer): self.layer_dict(layer) for layer in self.layers}}


class _LayerSums:
    def __init__(self, num_experts: int):
        self.slots = torch.zeros(num_experts, dtype=torch.float64)
        self.gate = torch.zeros(num_experts, dtype=torch.float64)
        self.reap = torch.zeros(num_experts, dtype=torch.float64)
        self.seen_by_experts_hook = False

    def add_routes(self, chosen: torch.Tensor, weights: torch.Tensor) -> None:
        n = self.slots.numel()
        flat = chosen.reshape(-1).cpu()
        keep = (flat >= 0) & (flat < n)  # some kernels mark dropped slots with an out-of-range id
        self.slots += torch.bincount(flat[keep], minlength=n)[:n].double()
        self.gate += torch.zeros(n, dtype=torch.float64).index_add_(0, flat[keep], weights.reshape(-1).cpu().double()[keep])


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 8) for v in values]


class _Scorer:
    """Hooks that add each forward's routes (and REAP terms) of every MoE layer to running sums."""

    def __init__(self, model: nn.Module, with_reap: bool):
        self.info = describe_moe(model)
        self.layers = find_moe_layers(model)
        self.sums = {layer.index: _LayerSums(self.info.num_experts) for layer in self.layers}
        self.with_reap = with_reap
        self.token_mask: torch.Tensor | None = None  # flattened, True = real token; set per batch by the driver
        self._inside = False  # the REAP recomputation calls the experts module again: do not count those calls
        self.capture = RouterCapture(model)  # router logits, the fallback for experts called another way
        self._handles = [layer.experts.register_forward_pre_hook(self._hook(layer), with_kwargs=True)
                         for layer in self.layers]

    def _hook(self, layer):
        def hook(module, args, kwargs):
            if self._inside:
                return
            values = list(args) + list(kwargs.values())
            if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]) or values[1].is_floating_point():
                return  # not the fused (hidden, top_k_index, top_k_weights) call
            hidden, chosen, weights = values[0], values[1], values[2]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if self.token_mask is not None and self.token_mask.numel() == hidden.shape[0]:
                mask = self.token_mask.to(hidden.device)
                hidden, chosen, weights = hidden[mask], chosen[mask], weights[mask]
            sums = self.sums[layer.index]
            sums.seen_by_experts_hook = True
            sums.add_routes(chosen, weights.float())
            if self.with_reap:
                self._add_reap(module, sums, hidden, chosen, weights)
        return hook

    def _add_reap(self, module, sums: _LayerSums, hidden, chosen, weights) -> None:
        self._inside = True
        try:
            for expert in range(sums.reap.numel()):
                routed = chosen == expert
                tokens = routed.any(dim=-1).nonzero().squeeze(-1)
                if tokens.numel() == 0:
                    continue
                gate = (weights * routed).sum(dim=-1)[tokens].float()
                route = torch.full((tokens.numel(), 1), expert, dtype=chosen.dtype, device=chosen.device)
                unit = torch.ones((tokens.numel(), 1), dtype=weights.dtype, device=weights.device)
                output = module(hidden[tokens], route, unit)
                sums.reap[expert] += float((gate * output.float().norm(dim=-1)).sum())
        finally:
            self._inside = False

    def add_fallback(self) -> None:
        """Routes from the router logits, for layers whose experts module the hook could not read."""
        layers, logits, chosen = self.capture.ordered()
        mask = self.capture.token_mask()
        for index, layer_logits, layer_chosen in zip(layers, logits, chosen):
            sums = self.sums[index]
            if sums.seen_by_experts_hook:
                continue
            probs = router_probabilities(layer_logits.float(), self.info.router_scoring)
            if layer_chosen is None:
                layer_chosen = probs.topk(self.info.top_k, dim=-1).indices
            if mask is not None:
                probs, layer_chosen = probs[mask], layer_chosen[mask]
            sums.add_routes(layer_chosen, probs.gather(-1, layer_chosen.long()))
        self.capture.clear()

    def result(self, tokens: int) -> ExpertScores:
        scores = ExpertScores(model_type=self.info.model_type, num_experts=self.info.num_experts,
                              top_k=self.info.top_k, tokens=tokens)
        reap_available = self.with_reap and all(s.seen_by_experts_hook for s in self.sums.values())
        scores.reap = {} if reap_available else None
        for index, sums in sorted(self.sums.items()):
            scores.token_share[index] = _rounded(sums.slots / sums.slots.sum().clamp_min(1e-30))
            scores.gate_mass[index] = _rounded(sums.gate / sums.gate.sum().clamp_min(1e-30))
            if scores.reap is not None:
                scores.reap[index] = _rounded(sums.reap / sums.slots.clamp_min(1.0))
        return scores

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.capture.remove()


def _as_batches(tokenizer, data: Iterable, batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    from moetune.telemetry import _batches  # the same row -> padded batch rules as `moetune routing`

    items = iter(data)
    first = next(items, None)
    if first is None:
        return
    if isinstance(first, dict) and isinstance(first.get("input_ids"), torch.Tensor):
        yield first
        yield from items
        return
    pad = tokenizer if tokenizer is not None else SimpleNamespace(pad_token_id=0)

    def chained():
        yield first
        yield from items

    yield from _batches(pad, chained(), batch_size, max_length)


def _within_budget(batch: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """The batch cut to its first `budget` real tokens: rows in order, the last one shortened.

    Shortening a row zeroes the attention mask of its last real tokens; with causal attention that is the same as
    cutting the row there.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.clone()
    rows, used = 0, 0
    for row, length in enumerate(mask.sum(dim=-1).tolist()):
        if used >= budget:
            break
        take = min(int(length), budget - used)
        if take < length:
            real = mask[row].nonzero().squeeze(-1)
            mask[row, real[take:]] = 0
        used += take
        rows = row + 1
    return {"input_ids": ids[:rows], "attention_mask": mask[:rows]}


def token_batches(data: Iterable, *, tokenizer=None, max_tokens: int, batch_size: int = 8,
                  max_length: int = 512) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches (`input_ids`, `attention_mask`) from `data` (see `score_experts`), `max_tokens` real tokens in all."""
    seen = 0
    for batch in _as_batches(tokenizer, data, batch_size, max_length):
        if seen >= max_tokens:
            return
        batch = _within_budget(batch, max_tokens - seen)
        if batch["input_ids"].numel() == 0:
            return
        seen += int(batch["attention_mask"].sum())
        yield batch


@torch.no_grad()
def score_experts(model: nn.Module, data: Iterable, *, tokenizer=None, max_tokens: int = 20000, batch_size: int = 8,
                  max_length: int = 512, reap: bool = True) -> ExpertScores:
    """Token share, gate mass and REAP saliency of every routed expert, measured on `data` (no gradients).

    Args:
        model: a MoE causal LM (plain, PEFT-wrapped or 4-bit).
        data: ready batches (dicts with tensor `input_ids`, optional `attention_mask`), or rows: texts (needs
            `tokenizer`), token-id lists, or dicts with `input_ids` (a tokenized datasets.Dataset).
        tokenizer: for texts and the pad id.
        max_tokens: stop after this many real tokens (the last batch is cut to fit).
        batch_size / max_length: how rows are batched and cut.
        reap: also compute REAP (one extra expert pass per layer).

    Returns:
        `ExpertScores`.
    """
    if max_tokens <= 0:
        raise MoetuneError(f"max_tokens must be positive, got {max_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scorer = _Scorer(model, with_reap=reap)
    seen = 0
    try:
        for batch in token_batches(data, tokenizer=tokenizer, max_tokens=max_tokens, batch_size=batch_size,
                                   max_length=max_length):
            scorer.token_mask = batch["attention_mask"].reshape(-1).bool()
            model(**{k: v.to(device) for k, v in batch.items()})
            scorer.add_fallback()
            seen += int(batch["attention_mask"].sum())
    finally:
        scorer.remove()
        model.train(was_training)
    if seen == 0:
        raise MoetuneError("no tokens to score the experts on: the data is empty")
    return scorer.result(seen)


def scores_from_report(report: dict[str, Any]) -> ExpertScores:
    """The `ExpertScores` kept in a routing report's layers (`telemetry.add_expert_scores`)."""
    layers = [layer for layer in report["layers"] if "scores" in layer]
    scores = ExpertScores(model_type=report.get("model_type", "?"), num_experts=report.get("num_experts", 0),
                          top_k=report.get("top_k", 0), tokens=report.get("tokens", 0))
    scores.reap = {} if all("reap" in layer["scores"] for layer in layers) else None
    for layer in layers:
        scores.token_share[layer["layer"]] = layer["scores"]["token_share"]
        scores.gate_mass[layer["layer"]] = layer["scores"]["gate_mass"]
        if scores.reap is not None:
            scores.reap[layer["layer"]] = layer["scores"]["reap"]
    return scores


def write_scores_plot(scores: ExpertScores, path: str | Path) -> Path:
    """A heat map per score (layers x experts) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in SCORES if k != "reap" or scores.reap is not None]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 + 1.2 * len(kinds) * max(1, scores.num_experts / 8), 3), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        values = scores.get(kind)
        image = ax.imshow([values[layer] for layer in scores.layers], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(scores.layers)), [str(layer) for layer in scores.layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(kind)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"expert scores ({scores.model_type}, {scores.tokens} tokens)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
