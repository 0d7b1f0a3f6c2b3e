"""`moetune inspect`: how big a MoE model is, how much of it is experts, and what it takes in bf16 and 4-bit.

The model is built on the meta device from its config alone: no weights are read, so a 100B+ model is inspected
in seconds. `quantize="4bit"` instead loads the real weights the moetune way and measures resident bytes.
"""

from typing import Any

from moetune.architectures import GROUPS, classify_parameters, describe_moe
from moetune.errors import MoetuneError
from moetune.loading import read_config


# Bytes per parameter of an nf4/fp4 weight with double quantization: 4 bits of code, one 8-bit absmax per block
# of 64, and one fp32 scale per 256 absmax values (bitsandbytes' nested statistics).
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Groups whose matrices moetune quantizes in 4-bit mode; the router stays fp32, embeddings, norms and the
# head stay at the model dtype (bf16).
QUANTIZED_GROUPS = ("attention", "experts", "shared_experts", "dense_mlp", "mamba", "linear_attention")


def build_on_meta(config, *, trust_remote_code: bool = False):
    """The model with every tensor on the meta device: shapes and module structure, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise MoetuneError(f"transformers cannot build a causal LM for model_type {config.model_type!r}: "
                           f"{str(err).splitlines()[0]}") from None


def _bytes_4bit(group: str, shape) -> float:
    numel = shape.numel()
    if group == "router":
        return 4.0 * numel
    if group in QUANTIZED_GROUPS and len(shape) >= 2:
        return NF4_DOUBLE_QUANT_BYTES * numel
    return 2.0 * numel


def inspect_model(name_or_path: str, *, quantize: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Parameter counts, shares and bytes per group, experts, top-k, MoE layers, total and active parameters.

    Args:
        name_or_path: a local model directory or a Hub id.
        quantize: None (estimate from the config), or "4bit" to load the weights with moetune's 4-bit loader and
            add the measured `resident_bytes` and `bytes_per_param`.
        trust_remote_code: allow model code from the Hub repo.

    Raises:
        MoetuneError: the path or config is bad, or the model is not MoE.
    """
    config = read_config(name_or_path, trust_remote_code=trust_remote_code)
    model = build_on_meta(config, trust_remote_code=trust_remote_code)
    info = describe_moe(model)
    groups = classify_parameters(model)

    per_group: dict[str, dict[str, float]] = {}
    for name, param in model.named_parameters():
        entry = per_group.setdefault(groups[name], {"params": 0, "bytes_bf16": 0, "bytes_4bit": 0.0})
        entry["params"] += param.numel()
        entry["bytes_bf16"] += 2 * param.numel()
        entry["bytes_4bit"] += _bytes_4bit(groups[name], param.shape)
    total = sum(int(g["params"]) for g in per_group.values())
    experts = int(per_group.get("experts", {}).get("params", 0))
    # Each token passes through top_k of num_experts routed experts and through everything else.
    active = total - experts + round(experts * info.top_k / info.num_experts)

    order = [g for g in GROUPS if g in per_group]
    report: dict[str, Any] = {
        "model": name_or_path,
        "model_type": info.model_type,
        "total_params": total,
        "active_params": active,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "moe_layers": info.moe_layers,
        "num_layers": info.num_layers,
        "router_scoring": info.router_scoring,
        "model_computes_aux_loss": info.model_computes_aux_loss,
        "uses_experts_implementation": info.uses_experts_implementation,
        "guessed_layout": info.guessed,
        "estimated_bytes_bf16": sum(int(g["bytes_bf16"]) for g in per_group.values()),
        "estimated_bytes_4bit": round(sum(g["bytes_4bit"] for g in per_group.values())),
        "groups": {
            g: {
                "params": int(per_group[g]["params"]),
                "share": per_group[g]["params"] / total,
                "bytes_bf16": int(per_group[g]["bytes_bf16"]),
                "bytes_4bit": round(per_group[g]["bytes_4bit"]),
            }
            for g in order
        },
    }
    if quantize is not None:
        _add_measured(report, name_or_path, quantize)
    return report


def _add_measured(report: dict[str, Any], name_or_path: str, quantize: str) -> None:
    if quantize != "4bit":
        raise MoetuneError(f"--quantize {quantize!r} is not supported; use --quantize 4bit")
    from moetune.config import QuantizationSection
    from moetune.quantization import measure_quantized

    measured = measure_quantized(name_or_path, QuantizationSection())
    report["resident_bytes"] = measured["resident_bytes"]
    report["bytes_per_param"] = measured["bytes_per_param"]
    for group, values in measured["groups"].items():
        # Buffers are no parameter group of the estimate; give them zero estimates so the table can print them.
        estimate = {"params": values.get("params", 0), "share": 0.0, "bytes_bf16": 0, "bytes_4bit": 0}
        report["groups"].setdefault(group, estimate)["resident_bytes"] = values["resident_bytes"]


def _count(n: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def _bytes(n: float) -> str:
    for suffix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{int(n)} B"


def format_report(report: dict[str, Any]) -> str:
    """The report as a terminal table."""
    measured = "resident_bytes" in report
    header = f"{'group':<17}{'params':>12}{'share':>8}{'bf16':>12}{'4-bit est.':>12}" + (f"{'4-bit meas.':>13}" if measured else "")
    lines = [f"{report['model']}  ({report['model_type']})", "", header, "-" * len(header)]
    for group, g in report["groups"].items():
        row = (f"{group:<17}{_count(g['params']):>12}{g['share']:>8.1%}{_bytes(g['bytes_bf16']):>12}"
               f"{_bytes(g['bytes_4bit']):>12}")
        if measured:
            row += f"{_bytes(g.get('resident_bytes', 0)):>13}"
        lines.append(row)
    lines.append("-" * len(header))
    total_row = (f"{'total':<17}{_count(report['total_params']):>12}{1:>8.0%}"
                 f"{_bytes(report['estimated_bytes_bf16']):>12}{_bytes(report['estimated_bytes_4bit']):>12}")
    if measured:
        total_row += f"{_bytes(report['resident_bytes']):>13}"
    lines += [total_row, ""]
    moe_layers = report["moe_layers"]
    lines += [
        f"experts: {report['num_experts']} per MoE layer, top-{report['top_k']} ({report['router_scoring']} router)",
        f"MoE layers: {len(moe_layers)} of {report['num_layers']} ({_ranges(moe_layers)})",
        f"total parameters: {report['total_params']:,}",
        f"active parameters per token: {report['active_params']:,} ({report['active_params'] / report['total_params']:.1%})",
    ]
    if measured:
        lines.append(f"measured 4-bit: {_bytes(report['resident_bytes'])} resident, {report['bytes_per_param']:.3f} bytes/param")
    if report["guessed_layout"]:
        lines.append("note: this family is not in moetune's map; the layout above was guessed from the module structure")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    spans, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            spans.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return "layers " + ", ".join(spans)

