"""Expert scores and expert-specialized fine-tuning: selection from measured shares, only the selected experts
change (AdamW with weight decay), the run's saved experts reload exactly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moetune.architectures import find_moe_layers
from moetune.esft import load_esft, select_by_share, select_experts
from moetune.expert_scores import score_experts
from moetune.telemetry import measure_routing


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN = str(REPO / "recipes/data/demo_train.jsonl")


@pytest.fixture(scope="module")
def forced_dir(tiny_model_dir, tmp_path_factory):
    """A tiny gpt_oss whose router biases send nearly every token to experts 0 and 2 (deterministic)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt_oss"))
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.router.weight.mul_(0.05)
            layer.router.bias.copy_(torch.tensor([2.0, 0.0, 1.6, 0.0]))
    out = tmp_path_factory.mktemp("forced")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir("gpt_oss")).save_pretrained(out)
    return out


def _batches(seed=0, n=3, rows=4, width=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[-1, width // 2:] = 0  # one padded row: padding never counts
        out.append({"input_ids": torch.randint(6, 400, (rows, width), generator=g), "attention_mask": mask})
    return out


def test_scores_sum_to_one_and_match_telemetry(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"))
    batches = _batches()
    scores = score_experts(model, batches, max_tokens=10**6)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert scores.tokens == real
    report = measure_routing(model, None, batches)
    for layer in report["layers"]:
        assert scores.token_share[layer["layer"]] == pytest.approx(layer["share"], abs=1e-6)
        assert sum(scores.gate_mass[layer["layer"]]) == pytest.approx(1.0, abs=1e-6)
        assert all(v > 0 for v in scores.reap[layer["layer"]])


def test_max_tokens_bounds_the_sample(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"))
    assert score_experts(model, _batches(), max_tokens=30).tokens == 30


def test_reap_is_mean_gate_times_output_norm(tiny_model_dir):
    """REAP recomputed by hand from the fused weights for one layer of the tiny Mixtral."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"))
    batch = {"input_ids": torch.randint(6, 400, (1, 20), generator=torch.Generator().manual_seed(1))}
    layer = find_moe_layers(model)[0]
    seen = {}

    def keep_first_call(module, args):
        seen.setdefault("args", args)  # the model's own call comes first; REAP's per-expert calls follow

    handle = layer.experts.register_forward_pre_hook(keep_first_call)
    scores = score_experts(model, [batch])
    handle.remove()
    hidden, index, weights = seen["args"]
    experts = layer.experts
    for e in range(4):
        rows = (index == e).any(-1)
        gate = (weights * (index == e)).sum(-1)[rows]
        g, u = torch.nn.functional.linear(hidden[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = torch.nn.functional.linear(experts.act_fn(g) * u, experts.down_proj[e])
        expected = (gate * out.norm(dim=-1)).mean().item() if rows.any() else 0.0
        assert scores.reap[layer.index][e] == pytest.approx(expected, rel=1e-4)


def test_select_by_cumulative_share():
    assert select_by_share([0.1, 0.5, 0.3, 0.1], 0.2) == [1]
    assert select_by_share([0.1, 0.5, 0.3, 0.1], 0.6) == [1, 2]
    assert select_by_share([0.1, 0.5, 0.3, 0.1], 0.8) == [1, 2]
    assert select_by_share([0.25, 0.25, 0.25, 0.25], 0.3) == [0, 1]  # ties: lower id first
    assert select_by_share([0.1, 0.5, 0.3, 0.1], 1.0) == [0, 1, 2, 3]


def test_selection_follows_forced_routing(forced_dir):
    model = AutoModelForCausalLM.from_pretrained(forced_dir)
    scores = score_experts(model, _batches())
    for layer in scores.layers:
        share = scores.token_share[layer]
        assert share[0] + share[2] > 0.9
        assert select_experts(scores, "tokens", 0.2).experts[layer] == [max((0, 2), key=share.__getitem__)]
        assert select_experts(scores, "tokens", 0.6).experts[layer] == [0, 2]
        gate = select_experts(scores, "gate", 0.6)
        assert gate.experts[layer] == select_by_share(scores.gate_mass[layer], 0.6)


def _esft_recipe(model_dir, out, **extra):
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "experts": {"select": {"score": "tokens", "top_p": 0.6, "max_tokens": 2000}},
        "moe": {"aux_loss": False},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "weight_decay": 0.1,
                  "optim": "adamw_torch", "logging_steps": 1, "save_strategy": "no", "seed": 0, "disable_tqdm": True},
        "output": {"dir": str(out)},
    }
    recipe.update(extra)
    return recipe


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_esft_changes_only_selected_experts_and_reloads(forced_dir, tmp_path):
    from moetune.training import finetune

    before = AutoModelForCausalLM.from_pretrained(forced_dir)
    out, _ = finetune(_esft_recipe(forced_dir, tmp_path / "run"))
    selection = json.loads((out / "expert_selection.json").read_text())
    assert all(v == [0, 2] for v in selection["experts"].values())

    # Only what changed is saved: the selected slices, no second copy of the base.
    assert not (out / "model.safetensors").exists() and (out / "esft_experts.safetensors").is_file()
    after = load_esft(AutoModelForCausalLM.from_pretrained(forced_dir), out)
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    for layer in find_moe_layers(after):
        chosen = selection["experts"][str(layer.index)]
        for name, _ in layer.experts.named_parameters():  # gate_up_proj, down_proj and their biases
            full = f"{layer.experts_name}.{name}"
            for e in range(4):
                same = torch.equal(old[full][e], new[full][e])
                assert same != (e in chosen), (full, e)
    # nothing else trained: freeze.train was not set
    for name, param in old.items():
        if ".experts." not in name:
            assert torch.equal(param, new[name]), name

    # chat/generate load it as trained, and `moetune merge` writes a plain checkpoint of base + slices.
    from moetune.inference import load_for_inference
    from moetune.merging import merge_run

    ids = torch.randint(6, 400, (2, 12), generator=torch.Generator().manual_seed(3))
    model, _ = load_for_inference(out)
    torch.testing.assert_close(_logits(model, ids), _logits(after, ids))
    report = merge_run(out, tmp_path / "merged", "float32")
    assert report.ok
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, ids), _logits(after, ids))


def test_optimizer_state_of_unselected_experts_stays_zero(forced_dir, tmp_path):
    from moetune.training import build_trainer

    trainer = build_trainer(_esft_recipe(forced_dir, tmp_path / "run"))
    trainer.train()
    for part in trainer.expert_mask.parts:
        state = trainer.optimizer.state[part.param]
        for key in ("exp_avg", "exp_avg_sq"):
            frozen = part.view(state[key])[part.ids]
            assert torch.count_nonzero(frozen) == 0, (part.name, key)


def test_lora_esft_trains_only_selected_rank_blocks_and_reloads(forced_dir, tmp_path):
    from moetune.esft import save_expert_selection
    from moetune.training import build_trainer

    recipe = _esft_recipe(forced_dir, tmp_path / "run", lora={"r": 2, "alpha": 4, "targets": ["experts"]})
    trainer = build_trainer(recipe)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    for name, start in lora.items():
        # lora_A [r*E, in] is expert-major; lora_B [out, r*E] is read as (out, r, E)
        view = (lambda t: t.view(4, -1)) if "lora_A" in name else (lambda t: t.view(t.shape[0], -1, 4).permute(2, 0, 1))
        before, after = view(start), view(trained[name].detach())
        for e in range(4):
            assert torch.equal(before[e], after[e]) == (e in (1, 3)), (name, e)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    save_expert_selection(trainer, out)
    assert (out / "expert_selection.json").is_file() and (out / "adapter_config.json").is_file()
    ids = torch.randint(6, 400, (2, 12), generator=torch.Generator().manual_seed(3))
    trainer.model.eval()
    reloaded = load_esft(AutoModelForCausalLM.from_pretrained(forced_dir), out)
    assert torch.allclose(_logits(reloaded, ids), _logits(trainer.model, ids), atol=1e-5)


def test_experts_with_lora_needs_expert_targets(forced_dir, tmp_path):
    from moetune.config import load_recipe
    from moetune.errors import RecipeError

    with pytest.raises(RecipeError, match="lora.targets` must include experts"):
        load_recipe(_esft_recipe(forced_dir, tmp_path / "run", lora={"r": 2, "targets": ["attention"]}))


def test_routing_command_reports_expert_scores(tiny_model_dir, tmp_path, capsys):
    from moetune.cli import main

    out = tmp_path / "routing"
    assert main(["routing", str(tiny_model_dir("mixtral")), DEMO_TRAIN, "--max-examples", "8", "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    for layer in report["layers"]:
        assert set(layer["scores"]) == {"token_share", "gate_mass", "reap"}
        assert layer["scores"]["token_share"] == pytest.approx(layer["share"], abs=1e-6)
    assert (out / "expert_scores.png").is_file()
