"""The routing report (`RoutingTelemetry.report()`, `moetune routing`) written and shown: routing.json,
routing.png (a figure that explains itself) and a terminal table. Works on the report dict alone, no model."""

import json
from pathlib import Path
from typing import Any


def write_routing_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `routing.json` and `routing.png` (see `routing_figure`) into `out_dir`, and `expert_scores.png` when
    the report carries expert scores (`moetune.telemetry.add_expert_scores`)."""
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
