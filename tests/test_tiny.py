"""`moetune tiny`: a model directory that loads like a Hub checkpoint, with a tokenizer whose chat template marks
assistant turns."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moetune.cli import main
from moetune.errors import MoetuneError
from moetune.tiny import make_tiny


def test_cli_writes_a_loadable_model_and_tokenizer(tmp_path, capsys):
    out = tmp_path / "tiny-olmoe"
    assert main(["tiny", "olmoe", str(out), "--hidden-size", "128", "--layers", "3", "--experts", "8"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)

    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_experts) == (128, 3, 8)
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("What is 12 plus 30?", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_chat_template_masks_exactly_the_assistant_turns(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("mixtral"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 7 times 8?"},
        {"role": "assistant", "content": "56"},
        {"role": "user", "content": "And 6 times 7?"},
        {"role": "assistant", "content": "42"},
    ]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    masked_text = tokenizer.decode([t for t, keep in zip(ids, mask) if keep])
    assert masked_text == "56<|im_end|>42<|im_end|>"
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|im_end|>"


def test_same_seed_same_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(make_tiny("qwen3_moe", tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(make_tiny("qwen3_moe", tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(make_tiny("qwen3_moe", tmp_path / "c", seed=4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_grouped_mm_runs_in_bf16(arch, tiny_model_dir):
    # grouped_mm on CPU needs 16-byte aligned strides (docs/upstream.md#grouped-mm-on-cpu); the tiny dims are chosen for it.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.bfloat16,
                                                 experts_implementation="grouped_mm")
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.bfloat16,
                                                 experts_implementation="eager")
    ids = torch.randint(6, 512, (2, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(eager(input_ids=ids, labels=ids).loss.item(), abs=0.05)


def test_unknown_arch_is_an_error(tmp_path):
    with pytest.raises(MoetuneError, match="unknown tiny architecture 'gpt5'"):
        make_tiny("gpt5", tmp_path)
