"""`moetune merge`: every adapter kind folded into a plain checkpoint, verified, and refused when it does not verify."""

import json

import pytest
import torch
from peft import PeftModel
from tiny_runs import make_run
from transformers import AutoModelForCausalLM

from moetune.cli import main
from moetune.config import ModelSection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.loading import load_model
from moetune.merging import TOLERANCE, _copy_dequantized_weights, merge_run, serving_warning
from moetune.run_info import read_run_dir


IDS = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(1))

CASES = [  # (family, adapter kind, merge dtype)
    ("mixtral", dict(targets=["attention"]), "float32"),
    ("qwen3_moe", dict(targets=["experts"]), "float32"),
    ("gpt_oss", dict(targets=["experts", "router"]), "bfloat16"),
    ("olmoe", dict(targets=["attention"], train_in_full=["router"]), "float32"),
    ("deepseek_v2", dict(targets=["attention", "experts"]), "bfloat16"),
    ("granitemoe", dict(targets=["experts", "router"]), "float16"),
]


def _per_token_rel_error(reference, other):
    return ((other - reference).abs().max(-1).values / reference.abs().max(-1).values).flatten()


@pytest.mark.parametrize("arch, options, dtype", CASES, ids=[f"{c[0]}-{'+'.join(c[1]['targets'])}-{c[2]}" for c in CASES])
def test_merged_model_matches_base_plus_adapter(arch, options, dtype, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    run = make_run(tmp_path / "run", model_dir, **options)
    report = merge_run(run, tmp_path / "merged", dtype)
    assert report.ok and report.sample_source.endswith("demo_eval.jsonl") and report.rows == 4
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["median_rel_error"] == report.median_rel_error <= TOLERANCE[dtype]
    if dtype == "float32":
        assert report.max_rel_error < 1e-4

    # The merged folder is a plain checkpoint: no adapter files, loads with transformers alone.
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    assert {"config.json", "tokenizer.json", "recipe.yaml", "README.md"} <= {p.name for p in merged_dir.iterdir()}
    assert "Merged with `moetune merge`" in (merged_dir / "README.md").read_text()
    torch_dtype = getattr(torch, dtype)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch_dtype).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype), str(run))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    with torch.no_grad():
        expected, got, before = unmerged.eval()(IDS).logits.float(), merged(IDS).logits.float(), base(IDS).logits.float()
    assert _per_token_rel_error(expected, got).median() <= TOLERANCE[dtype]
    assert _per_token_rel_error(expected, before).median() > 10 * TOLERANCE[dtype]  # the adapter does change things
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_4bit_run_merges_into_the_dequantized_base(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("mixtral")
    run = make_run(tmp_path / "run", model_dir, targets=["experts", "attention"], quantized=True)  # fp32 compute
    # The base the adapter was trained on, in full precision: computes what the 4-bit model computes.
    plain = load_model(ModelSection(name_or_path=str(model_dir), dtype="float32"), router_fp32=False)[0].eval()
    _copy_dequantized_weights(read_run_dir(run), plain)
    quantized = load_model(ModelSection(name_or_path=str(model_dir), dtype="float32"), QuantizationSection(),
                           router_fp32=False)[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, quantized(IDS).logits, atol=2e-5, rtol=1e-4)

    report = merge_run(run, tmp_path / "merged", "float32")
    assert report.ok and report.max_rel_error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not getattr(merged, "is_loaded_in_4bit", False) and "quantization_config" not in merged.config.to_dict()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(plain, str(run)).eval()(IDS).logits
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)

    assert merge_run(run, tmp_path / "merged-bf16", "bfloat16").ok


def _expect_refused(run, out, dtype="float32"):
    with pytest.raises(MoetuneError, match=r"does not reproduce base \+ adapter: .*median relative error ([0-9.e+-]+)") as err:
        merge_run(run, out, dtype)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))
    return err.value


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_merge_that_skips_the_expert_lora_is_refused(tiny_model_dir, tmp_path, monkeypatch, dtype):
    from peft.tuners.lora.layer import ParamWrapper

    run = make_run(tmp_path / "run", tiny_model_dir("qwen3_moe"), targets=["experts"])
    monkeypatch.setattr(ParamWrapper, "merge", lambda self, *args, **kwargs: None)
    message = str(_expect_refused(run, tmp_path / "merged", dtype))
    assert "Nothing was written" in message


def test_a_modified_weight_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model_dir("mixtral"), targets=["attention"], train_in_full=["router"])
    from peft.tuners.lora import LoraModel

    original = LoraModel.merge_and_unload

    def merge_and_corrupt(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.gate.weight.mul_(-1.0)  # e.g. a router copy restored wrongly
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_and_corrupt)
    _expect_refused(run, tmp_path / "merged")


def test_cli_merge_and_its_errors(tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir("olmoe"), targets=["attention"])
    assert main(["merge", str(run), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "median relative error" in out and f"wrote {tmp_path / 'merged'}" in out
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 1
    assert "nothing to merge" in capsys.readouterr().err


def test_serving_warning_names_engines_and_the_fix(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("mixtral")
    experts = make_run(tmp_path / "experts", model_dir, targets=["experts", "attention"], steps=1)
    warning = serving_warning(experts)
    assert "vLLM" in warning and "SGLang" in warning and "moetune merge" in warning and "modules_to_save" not in warning
    in_full = make_run(tmp_path / "in_full", model_dir, targets=["attention"], train_in_full=["router"], steps=1)
    assert "modules trained in full (router" in serving_warning(in_full)
    assert serving_warning(make_run(tmp_path / "attention", model_dir, targets=["attention"], steps=1)) is None
