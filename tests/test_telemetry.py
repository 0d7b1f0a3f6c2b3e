"""Routing telemetry: shares sum to 1 per layer, padding is excluded, a forced collapse and dying experts warn,
reports are written and formatted, and `moetune routing` measures a model from paths."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from moetune.architectures import find_moe_layers
from moetune.routing_report import format_routing_report, routing_figure, write_routing_report
from moetune.telemetry import RoutingTelemetry, measure_routing, routing_from_paths
from moetune.tiny import build_tokenizer, tiny_config


def _model(arch="mixtral"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


IDS = torch.randint(6, 300, (4, 16), generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_shares_sum_to_one_per_layer(arch):
    model = _model(arch)
    with RoutingTelemetry.attach(model, training_only=False) as telemetry, torch.no_grad():
        model(input_ids=IDS)
        model(input_ids=IDS[:2])
    report = telemetry.report()
    assert [layer["layer"] for layer in report["layers"]] == [layer.index for layer in find_moe_layers(model)]
    for layer in report["layers"]:
        assert sum(layer["share"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(layer["first_choice_share"]) == pytest.approx(1.0, abs=1e-5)
        assert layer["tokens"] == 6 * 16
        assert 0.0 < layer["normalized_entropy"] <= 1.0
        assert layer["max_over_mean"] == pytest.approx(max(layer["share"]) * report["num_experts"], rel=1e-4)


def test_padding_is_excluded():
    model = _model()
    lengths = [16, 9, 4, 12]
    mask = torch.zeros_like(IDS)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    padded = IDS.masked_fill(mask == 0, 0)
    with RoutingTelemetry.attach(model, training_only=False) as telemetry, torch.no_grad():
        model(input_ids=padded, attention_mask=mask)
    with RoutingTelemetry.attach(model, training_only=False) as separate, torch.no_grad():
        for row, n in enumerate(lengths):
            model(input_ids=IDS[row : row + 1, :n])
    ours, expected = telemetry.report()["layers"], separate.report()["layers"]
    for a, b in zip(ours, expected):
        assert a["tokens"] == sum(lengths)
        assert a["share"] == pytest.approx(b["share"], abs=1e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)


def _force_collapse(model, dead=(2, 3)):
    """Every token gets a large +dim-0 component; layer 0's router then prefers expert 0 and never picks `dead`."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        router = find_moe_layers(model)[0].router
        router.weight[0, 0] = 10.0
        for expert in dead:
            router.weight[expert, 0] = -10.0


def test_forced_collapse_and_dying_experts_warn(caplog):
    model = _model()
    telemetry = RoutingTelemetry(training_only=False).bind(model)
    with torch.no_grad():
        model(input_ids=IDS)
    metrics = telemetry.log_metrics(step=1)
    assert metrics["routing/dead_experts"] == 0 and not telemetry.warnings
    _force_collapse(model)
    with caplog.at_level(logging.WARNING, logger="moetune.telemetry"), torch.no_grad():
        model(input_ids=IDS)
        metrics = telemetry.log_metrics(step=2)
    report = telemetry.report()
    telemetry.unbind()
    assert metrics["routing/dead_experts"] >= 2
    text = caplog.text
    assert "routing collapse in layer 0: expert 0 gets 100% of the first choices" in text
    assert "dead expert in layer 0: expert 2" in text and "dead expert in layer 0: expert 3" in text
    # (the +50 component rides the residual stream into layer 1, which collapses too, onto its own favourite)
    assert report["warnings"] == telemetry.warnings and all(w in text for w in report["warnings"])
    assert report["history"][1]["layers"][0]["dead_experts"] == [2, 3]


def test_training_only_skips_eval_forwards():
    model = _model()
    with RoutingTelemetry.attach(model) as telemetry, torch.no_grad():
        model.eval()
        model(input_ids=IDS)
        assert telemetry.report()["tokens"] == 0
        model.train()
        model(input_ids=IDS)
        assert telemetry.report()["tokens"] == IDS.numel()


def test_measure_write_and_format(tmp_path):
    model = _model("qwen3_moe")
    tokenizer = build_tokenizer()
    texts = ["def add(a, b):\n    return a + b", "hello world", "for i in range(10): print(i)"]
    report = measure_routing(model, tokenizer, texts, batch_size=2)
    assert report["tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    json_path, png_path = write_routing_report(report, tmp_path)
    assert json.loads(json_path.read_text())["layers"] == report["layers"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_routing_report(report)
    assert "qwen3_moe: 4 experts, top-2" in table and len(table.splitlines()) >= 2 + len(report["layers"])


def test_routing_from_paths(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(10)]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    report = routing_from_paths(str(tiny_model_dir("mixtral")), str(data), max_examples=6, batch_size=4)
    assert report["model_type"] == "mixtral" and report["tokens"] > 6 * 5
    assert all(sum(layer["share"]) == pytest.approx(1.0, abs=1e-5) for layer in report["layers"])


def _plots(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_routing_figure_explains_itself(tmp_path):
    import matplotlib.pyplot as plt

    model = _model()
    telemetry = RoutingTelemetry(training_only=False).bind(model)
    with torch.no_grad():
        model(input_ids=IDS)
        telemetry.log_metrics(step=10)
        _force_collapse(model)
        model(input_ids=IDS)
        telemetry.log_metrics(step=20)
    report = telemetry.report()
    telemetry.unbind()
    fig = routing_figure(report)
    first, last, imbalance = _plots(fig)  # before | after | imbalance over training
    assert (first.get_title(), last.get_title()) == ("first interval (step 10)", "last interval (step 20)")
    assert [ax.get_xlabel() for ax in (first, last, imbalance)] == ["expert", "expert", "training step"]
    assert first.get_ylabel() == "MoE layer" and imbalance.get_ylabel() == "max/mean share"
    colorbar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    assert colorbar.get_xlabel().startswith("share of routed slots") and "1/E = 25%" in [t.get_text() for t in colorbar.get_xticklabels()]
    dead_last = sum(len(layer["dead_experts"]) for layer in report["history"][-1]["layers"])
    assert dead_last >= 2 and sum(line.get_marker() == "x" for line in last.lines) == dead_last
    assert not any(line.get_marker() == "x" for line in first.lines)
    assert [line.get_label() for line in imbalance.lines][:2] == ["layer 0", "layer 1"]
    assert list(imbalance.lines[0].get_xdata()) == [10, 20]
    assert "top-2" in fig._suptitle.get_text() and "slots" in fig._suptitle.get_text()
    plt.close(fig)

    measured = measure_routing(model, build_tokenizer(), ["hello world", "one two three"])  # no history
    fig = routing_figure(measured)
    heatmap, per_layer = _plots(fig)
    assert heatmap.get_xlabel() == "expert" and per_layer.get_xlabel() == "MoE layer"
    plt.close(fig)
    _, png = write_routing_report(report, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
