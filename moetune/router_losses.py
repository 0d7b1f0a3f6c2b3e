"""Router losses: load-balancing aux loss (per family scoring) and ST-MoE's router z-loss. Pure tensor math.

The inputs are the router logits (and chosen experts) that `moetune.router_capture.RouterCapture` records with
forward hooks; this module knows nothing about models or hooks.
"""

from collections.abc import Sequence
from typing import Literal

import torch


def router_probabilities(logits: torch.Tensor, scoring: Literal["softmax", "sigmoid"]) -> torch.Tensor:
    """Per-token routing distribution over experts, in fp32: softmax, or sigmoid affinities normalized to sum 1.

    The sigmoid form is DeepSeek-V3's (its balance loss normalizes the affinities over experts).
    """
    logits = logits.float()
    if scoring == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits.softmax(dim=-1)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    *,
    scoring: Literal["softmax", "sigmoid"] = "softmax",
    token_mask: torch.Tensor | None = None,
    top_k_index: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss, `num_experts * sum_i f_i * P_i`, over all MoE layers together.

    `f_i` is the fraction of routed slots that went to expert i, `P_i` the mean routing probability of expert i.
    Layers are pooled (as transformers' `load_balancing_loss_func` does), so for softmax routers this equals the
    loss the model itself returns. A perfectly balanced router gives `top_k`.

    Args:
        router_logits: one `[tokens, num_experts]` tensor per MoE layer (same token order in every layer).
        num_experts: routed experts per layer.
        top_k: experts per token.
        scoring: "softmax" or "sigmoid" (DeepSeek-V3, GLM-4-MoE, Llama-4): how logits become probabilities.
        token_mask: `[tokens]` bool/0-1, False for padding; padding never counts. None counts every token.
        top_k_index: per layer, the experts the model really chose (`[tokens, top_k]`), or None to take the
            top-k of the probabilities.

    Returns:
        A scalar fp32 tensor that carries gradients to the routers.
    """
    device = router_logits[0].device
    slots = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    mask = None if token_mask is None else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for layer, logits in enumerate(router_logits):
        probs = router_probabilities(logits, scoring)
        chosen = top_k_index[layer] if top_k_index is not None and top_k_index[layer] is not None else None
        if chosen is None:
            chosen = probs.topk(top_k, dim=-1).indices
        weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        slots = slots.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(chosen.shape[-1]))
        prob_sum = prob_sum + (probs * weight.unsqueeze(-1)).sum(dim=0)
        rows = rows + weight.sum()
    rows = rows.clamp_min(1.0)  # an all-padding batch gives 0, not NaN
    return num_experts * torch.sum((slots / rows) * (prob_sum / rows))


def router_z_loss(router_logits: Sequence[torch.Tensor], *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (layer, token) of `logsumexp(logits)^2`, padding excluded. fp32 scalar."""
    total = torch.zeros((), device=router_logits[0].device)
    rows = torch.zeros((), device=router_logits[0].device)
    mask = None if token_mask is None else token_mask.reshape(-1).to(device=total.device, dtype=torch.float32)
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).square()
        total = total + (z.sum() if mask is None else (z * mask).sum())
        rows = rows + (z.numel() if mask is None else mask.sum())
    return total / rows.clamp_min(1.0)
