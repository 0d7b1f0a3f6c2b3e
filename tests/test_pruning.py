"""Expert pruning: exactly the lowest-scoring experts go, the result equals the original with their routes masked,
and every tiny family prunes and reloads with plain transformers (or says clearly why not)."""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moetune.architectures import describe_moe, find_moe_layers
from moetune.errors import MoetuneError
from moetune.expert_scores import ExpertScores
from moetune.pruning import experts_to_keep, prune_model, pruned_config, resolve_keep
from moetune.tiny import TINY_ARCHS


REPO = Path(__file__).resolve().parent.parent
IDS = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@contextmanager
def masked_router_logits(model, removed: dict[int, list[int]]):
    """The original model with the removed experts' router logits at -inf (routers that call `F.linear`)."""
    masks = {id(layer.router.weight): torch.tensor(removed[layer.index]) for layer in find_moe_layers(model)}
    module = sys.modules[type(model).__module__]
    real = module.F

    class Masked:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def linear(x, weight, bias=None):
            out = real.linear(x, weight, bias)
            if id(weight) in masks:
                out = out.index_fill(-1, masks[id(weight)], float("-inf"))
            return out

    module.F = Masked()
    try:
        yield
    finally:
        module.F = real


def test_keep_count_and_fraction():
    assert resolve_keep(3, 8) == 3 and resolve_keep(0.75, 8) == 6 and resolve_keep(0.5, 4) == 2
    for bad in (0, 9, 1.5, -1):
        with pytest.raises(MoetuneError):
            resolve_keep(bad, 8)


def test_removes_exactly_the_lowest_scoring_experts():
    scores = ExpertScores("mixtral", 4, 2, 100, token_share={0: [0.4, 0.1, 0.3, 0.2], 1: [0.1, 0.2, 0.3, 0.4]},
                          gate_mass={0: [0.1, 0.2, 0.3, 0.4], 1: [0.25, 0.25, 0.25, 0.25]})
    assert experts_to_keep(scores, 2, "tokens") == {0: [0, 2], 1: [2, 3]}
    assert experts_to_keep(scores, 3, "gate") == {0: [1, 2, 3], 1: [0, 1, 2]}  # ties: lower id kept


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_pruned_model_equals_original_with_removed_routes_masked(tiny_model_dir, arch):
    # mixtral renormalizes its top-k weights, qwen3_moe (norm_topk_prob false) does not, gpt_oss softmaxes the top-k
    # logits, deepseek_v3 is sigmoid with a bias correction: in all of them -inf logits and a pruned router agree.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    info = describe_moe(model)
    keep = {layer: [0, 2, 3] if layer % 2 else [1, 2, 3] for layer in info.moe_layers}
    pruned = prune_model(model, keep)
    with masked_router_logits(model, {layer: sorted(set(range(4)) - set(ids)) for layer, ids in keep.items()}):
        masked = _logits(model)
    assert torch.allclose(_logits(pruned), masked, atol=1e-5)
    assert not torch.allclose(_logits(model), masked, atol=1e-3)  # the removed experts did matter
    new = dict(pruned.named_parameters())
    for layer in find_moe_layers(model):
        for name, param in layer.router.named_parameters():
            full = f"{layer.router_name}.{name}"
            assert torch.equal(new[full], param[keep[layer.index]])


def test_pruning_to_all_experts_is_a_no_op(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2_moe")).eval()
    pruned = prune_model(model, {layer: [0, 1, 2, 3] for layer in describe_moe(model).moe_layers})
    assert torch.equal(_logits(pruned), _logits(model))


def test_top_k_is_lowered_to_the_kept_experts(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral")).eval()
    pruned = prune_model(model, {layer: [3] for layer in describe_moe(model).moe_layers})
    assert (pruned.config.num_local_experts, pruned.config.num_experts_per_tok) == (1, 1)
    assert torch.isfinite(_logits(pruned)).all()


def test_group_limited_routing_stays_valid(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("deepseek_v3"))
    config.n_group, config.topk_group = 2, 2
    assert (pruned_config(config, 3).n_group, pruned_config(config, 3).topk_group) == (1, 1)
    config.topk_group = 1
    with pytest.raises(MoetuneError, match="group-limited"):
        pruned_config(config, 3)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_prunes_and_reloads_with_plain_transformers(tiny_model_dir, tmp_path, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    info = describe_moe(model)
    keep = {layer: [0, 1, 3] for layer in info.moe_layers}
    if arch == "jetmoe":  # its expert count also sizes the mixture-of-attention experts
        with pytest.raises(MoetuneError, match="cannot prune jetmoe: .*mixture-of-attention"):
            prune_model(model, keep)
        return
    pruned = prune_model(model, keep)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert describe_moe(reloaded).num_experts == 3
    for layer in find_moe_layers(reloaded):
        for _, param in layer.experts.named_parameters():
            assert param.shape[0] in (3, 3 * 32)  # dbrx: [E*F, H] with F = 32
    assert torch.equal(_logits(reloaded), _logits(pruned))


def test_prune_command_writes_checkpoint_and_report(tiny_model_dir, tmp_path, capsys):
    from moetune.cli import main

    out = tmp_path / "pruned"
    data = str(REPO / "recipes/data/demo_train.jsonl")
    assert main(["prune", str(tiny_model_dir("mixtral")), data, str(out), "--keep", "0.5", "--score", "reap",
                 "--max-tokens", "600"]) == 0
    printed = capsys.readouterr().out
    assert "calibration loss" in printed and "active parameters" in printed
    report = json.loads((out / "prune_report.json").read_text())
    assert report["num_experts"] == [4, 2] and report["params"][1] < report["params"][0]
    assert report["calibration_tokens"] == 600
    for layer, removed in report["removed"].items():
        scores = report["scores"][layer]
        assert max(scores[e] for e in removed) <= min(scores[e] for e in report["kept"][layer])
    assert describe_moe(AutoModelForCausalLM.from_pretrained(out)).num_experts == 2


def test_prune_keeps_the_checkpoint_dtype_and_names_a_folder_without_tokenizer(tiny_model_dir, tmp_path, capsys):
    import shutil

    from moetune.cli import main

    data = str(REPO / "recipes/data/demo_train.jsonl")
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3_moe"), dtype=torch.bfloat16).save_pretrained(source)
    assert main(["prune", str(source), data, str(tmp_path / "x"), "--keep", "2", "--max-tokens", "200"]) != 0
    error = capsys.readouterr().err
    assert "tokenizer" in error and str(source) in error and "Traceback" not in error
    assert not (tmp_path / "x").exists()  # nothing written before the mistake was found
    for file in tiny_model_dir("qwen3_moe").iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(file, source / file.name)
    assert main(["prune", str(source), data, str(tmp_path / "out"), "--keep", "2", "--max-tokens", "200"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert describe_moe(reloaded).num_experts == 2
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
