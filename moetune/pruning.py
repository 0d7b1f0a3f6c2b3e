"""Expert pruning: drop the lowest-scoring routed experts of every MoE layer, write a plain transformers checkpoint.

    moetune prune MODEL DATA OUT --keep 0.75 --score reap

The experts are scored on calibration data (`expert_scores.score_experts`: REAP, token share or gate mass), and
every MoE layer keeps its N best (the config holds one expert count, so N is the same in every layer). The pruned
model is built from an edited config, with the state dict cut consistently: every expert parameter (biases too) on
its expert axis (dbrx's 2-D [E*F, H] stacks as E blocks of rows), and in the router every tensor with an expert axis (weight rows, bias, the sigmoid families'
`e_score_correction_bias`). Shared experts are untouched. top-k is lowered to N where it exceeded it, and
group-limited routing must stay valid. What the pruned model computes is the original with the removed experts'
router logits at -inf: softmax (and top-k renormalization) then runs over the kept experts only, so for families that
do not renormalize top-k weights the kept experts' weights rise a little (their softmax no longer shares mass with
the removed ones); that is the same as masking the logits, not as zeroing the removed experts' outputs.
"""

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetune.architectures import _NUM_EXPERTS_KEYS, _TOP_K_KEYS, describe_moe, moe_layout
from moetune.errors import MoetuneError
from moetune.expert_scores import ExpertScores, score_experts, token_batches


# Families whose experts cannot be cut by the rules above, and why.
_BLOCKED = {
    "jetmoe": "jetmoe's num_local_experts also sizes the mixture-of-attention experts inside every attention layer, "
              "so its MLP experts cannot be pruned alone",
}


def resolve_keep(keep: float, num_experts: int) -> int:
    """`--keep` as a count: an integer >= 1 is a count, a number in (0, 1) a fraction of the experts (rounded)."""
    if keep >= 1:
        if keep != int(keep):
            raise MoetuneError(f"--keep {keep}: a count must be a whole number (or give a fraction below 1)")
        count = int(keep)
    elif keep > 0:
        count = max(1, round(keep * num_experts))
    else:
        raise MoetuneError(f"--keep must be a count >= 1 or a fraction in (0, 1), got {keep}")
    if count > num_experts:
        raise MoetuneError(f"--keep {count}: the model has only {num_experts} experts per MoE layer")
    return count


def experts_to_keep(scores: ExpertScores, keep: int, score: str) -> dict[int, list[int]]:
    """Per MoE layer, the ids of the `keep` highest-scoring experts (ties: lower id kept), ascending."""
    values = scores.get(score)
    return {layer: sorted(sorted(range(len(v)), key=lambda e: (-v[e], e))[:keep]) for layer, v in values.items()}


def pruned_config(config, kept: int):
    """A copy of `config` with `kept` routed experts, top-k at most `kept`, group-limited routing still valid."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    fields = text.to_dict()
    # dbrx keeps its MoE keys in a sub-config (ffn_config); every other family at the top of the text config
    for owner in (text, getattr(text, "ffn_config", None)):
        if owner is None or not hasattr(owner, "to_dict"):
            continue
        owned = owner.to_dict()
        for key in _NUM_EXPERTS_KEYS:  # only the real keys; aliases (attribute_map) follow them
            if owned.get(key) is not None:
                setattr(owner, key, kept)
        for key in _TOP_K_KEYS:
            value = owned.get(key)
            if isinstance(value, (list, tuple)):
                setattr(owner, key, [min(int(v), kept) for v in value])
            elif value is not None:
                setattr(owner, key, min(int(value), kept))
    n_group, topk_group = fields.get("n_group"), fields.get("topk_group")
    if n_group is not None and n_group > 1:
        if topk_group is not None and topk_group >= n_group:
            text.n_group, text.topk_group = 1, 1  # every group is picked anyway: the same routing without groups
        else:
            raise MoetuneError(
                f"{text.model_type} routes group-limited (n_group={n_group}, topk_group={topk_group}): experts are "
                "chosen within contiguous groups, and removing experts would regroup them. Pruning such a model is "
                "not supported"
            )
    return config


def _cut(tensor: torch.Tensor, ids: torch.Tensor, num_experts: int, key: str, expert_stack: bool) -> torch.Tensor:
    if expert_stack:
        if tensor.shape[0] % num_experts:
            raise MoetuneError(f"{key} has shape {tuple(tensor.shape)}: not stacked on a first axis of {num_experts} "
                               "experts, so moetune prune cannot cut it")
        # [E, ...] fused stacks, or dbrx's expert-major 2-D [E*F, H] rows
        per_expert = tensor.reshape(num_experts, -1, *tensor.shape[1:])
        return per_expert.index_select(0, ids.to(tensor.device)).reshape(-1, *tensor.shape[1:])
    for dim, size in enumerate(tensor.shape):
        if size == num_experts:
            return tensor.index_select(dim, ids.to(tensor.device))
    return tensor  # a router tensor without an expert axis


def pruned_state_dict(model: nn.Module, keep: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """The model's state dict with the experts (and router entries) not in `keep` removed."""
    layout = moe_layout(model)
    num_experts = describe_moe(model).num_experts
    state = dict(model.state_dict())
    for layer in layout.moe_layers:
        ids = torch.tensor(keep[layer.index], dtype=torch.long)
        shared = tuple(f"{name}." for name, _ in layer.shared)
        for key in list(state):
            if not key.startswith(f"{layer.block_name}.") or key.startswith(shared):
                continue
            is_router = key.startswith(f"{layer.router_name}.")
            is_expert = key.startswith(f"{layer.experts_name}.") and not is_router
            if is_router or is_expert:
                state[key] = _cut(state[key], ids, num_experts, key, expert_stack=is_expert)
    return state


def prune_model(model: nn.Module, keep: dict[int, list[int]]) -> nn.Module:
    """A new model with only the experts in `keep` (layer -> expert ids, the same count in every layer).

    Raises:
        MoetuneError: the family cannot be pruned (dbrx, jetmoe), the counts differ between layers, or the
            group-limited routing would break.
    """
    from transformers import AutoModelForCausalLM

    info = describe_moe(model)
    if info.model_type in _BLOCKED:
        raise MoetuneError(f"cannot prune {info.model_type}: {_BLOCKED[info.model_type]}")
    counts = {len(set(ids)) for ids in keep.values()}
    if len(counts) != 1 or set(keep) != set(info.moe_layers):
        raise MoetuneError(f"keep one expert list per MoE layer ({info.moe_layers}), all of the same length; got "
                           f"{ {k: len(v) for k, v in keep.items()} }")
    kept = counts.pop()
    config = pruned_config(model.config, kept)
    state = pruned_state_dict(model, keep)
    dtype = next(model.parameters()).dtype
    # Built on the meta device and given the cut tensors: no second initialization of a large model.
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary inv_freq): not in the state dict, same as the original's
            owner, _, attr = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[attr] = model.get_buffer(name).clone()
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        pruned.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    return pruned


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the real tokens of `batches`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


def prune(model_path: str, data_path: str, out_dir: str, *, keep: float, score: str = "reap",
          max_tokens: int = 20000, max_length: int = 512, batch_size: int = 8) -> dict[str, Any]:
    """`moetune prune`: score on the calibration data, prune, write `out_dir`, report sizes and losses.

    Returns:
        The report: kept/removed experts per layer, parameters, active parameters and bytes (bf16, 4-bit estimates)
        before and after, calibration loss before and after. Also written to `out_dir/prune_report.json`.
    """
    from moetune.config import DataSection, ModelSection
    from moetune.data import load_datasets
    from moetune.loading import load_model, read_config
    from moetune.sizing import inspect_model

    # load_model's checks (missing or truncated weights, no tokenizer: named before any weight is read), in the
    # checkpoint's own dtype so that the pruned checkpoint keeps it.
    model, tokenizer = load_model(ModelSection(name_or_path=model_path, dtype=_saved_dtype(model_path, read_config)))
    info = describe_moe(model)
    if info.model_type in _BLOCKED:  # before scoring: say it at once
        raise MoetuneError(f"cannot prune {info.model_type}: {_BLOCKED[info.model_type]}")
    count = resolve_keep(keep, info.num_experts)
    rows = load_datasets(DataSection(train=data_path, max_length=max_length), tokenizer).train
    batches = list(token_batches(rows, tokenizer=tokenizer, max_tokens=max_tokens, batch_size=batch_size,
                                 max_length=max_length))
    scores = score_experts(model, batches, max_tokens=max_tokens, reap=score == "reap")
    keep_ids = experts_to_keep(scores, count, score)
    loss_before = calibration_loss(model, batches)
    pruned = prune_model(model, keep_ids)
    try:
        loss_after = calibration_loss(pruned, batches)
    except Exception as err:  # a family rule this module does not know broke the pruned model: say which
        raise MoetuneError(f"the pruned {info.model_type} model does not run: {type(err).__name__}: {err}") from err
    out = Path(out_dir)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    before, after = inspect_model(model_path), inspect_model(str(out))
    report = {
        "model": model_path, "out": str(out), "model_type": info.model_type, "score": score,
        "calibration_tokens": scores.tokens, "num_experts": [info.num_experts, count],
        "top_k": [info.top_k, after["top_k"]],
        "kept": {str(k): v for k, v in keep_ids.items()},
        "removed": {str(k): sorted(set(range(info.num_experts)) - set(v)) for k, v in keep_ids.items()},
        "scores": {str(k): v for k, v in scores.get(score).items()},
        "params": [before["total_params"], after["total_params"]],
        "active_params": [before["active_params"], after["active_params"]],
        "bytes_bf16": [before["estimated_bytes_bf16"], after["estimated_bytes_bf16"]],
        "bytes_4bit": [before["estimated_bytes_4bit"], after["estimated_bytes_4bit"]],
        "calibration_loss": [loss_before, loss_after],
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _saved_dtype(model_path: str, read_config) -> str:
    try:
        dtype = read_config(model_path).dtype
    except MoetuneError as err:
        raise MoetuneError(f"model {model_path!r}: {err}") from None
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def format_prune_report(report: dict[str, Any]) -> str:
    def row(label: str, key: str, fmt: str = ",") -> str:
        old, new = report[key]
        change = f"{(new - old) / old:+.1%}" if old else ""
        return f"{label:<22}{old:>16{fmt}}{new:>16{fmt}}  {change}"

    lines = [f"pruned {report['model']} -> {report['out']} ({report['model_type']}, {report['score']} scores on "
             f"{report['calibration_tokens']} tokens)", f"{'':<22}{'before':>16}{'after':>16}"]
    lines += [row("experts per layer", "num_experts"), row("top-k", "top_k"), row("parameters", "params"),
              row("active parameters", "active_params"), row("bytes (bf16)", "bytes_bf16"),
              row("bytes (4-bit est.)", "bytes_4bit"), row("calibration loss", "calibration_loss", ".4f")]
    lines += [f"layer {layer}: removed experts {removed}" for layer, removed in report["removed"].items()]
    return "\n".join(lines)
