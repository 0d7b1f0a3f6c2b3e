"""Tiny random-weight MoE models and a locally built tokenizer, for tests, the offline demo and smoke tests.

`make_tiny("qwen3_moe", "runs/tiny")` writes a model directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load like any Hub checkpoint, so the real loading code is what gets exercised.
Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small built-in corpus.
"""

import json
from pathlib import Path
from typing import Any

from moetune.errors import MoetuneError


# ChatML with `{% generation %}` markers around what the assistant says (and its end token), so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` and TRL's assistant-only loss work.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 512

# A little English, code and arithmetic so that the BPE merges are not degenerate. Byte-level BPE covers
# every byte, so any text tokenizes; this only decides which merges exist.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few experts.
Question: what is the capital of France? Answer: Paris. Translate to French: good morning -> bonjour.
Reverse the word "model": ledom. Sort the letters of "expert": eeprtx. Count the vowels in "router": 3.
What is 12 plus 30? 42. What is 7 times 8? 56. What is 100 minus 58? 42. Spell "token" backwards: nekot.
def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i * i)\n
The user asks a question and the assistant answers it briefly and correctly. Instruction: summarize.
Input: The router sends tokens to experts. Output: Tokens are routed to experts. Hello, world! Yes. No.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred
red orange yellow green blue indigo violet black white cat dog bird fish horse cow sheep lion tiger
"""


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template, built offline.

    Returns:
        A `PreTrainedTokenizerFast` with pad `<pad>`, bos `<s>`, eos `<|im_end|>` (what chat turns end with).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


# Shared shape of every tiny model: dims are multiples of 8 so grouped_mm's 16-byte stride rule holds in
# fp32 and bf16 (docs/upstream.md#grouped-mm-on-cpu). Four experts, top-2, two layers.
_HIDDEN, _HEADS, _KV_HEADS, _EXPERTS, _TOP_K, _LAYERS = 64, 4, 2, 4, 2, 2

# Per family: the config class name and the keyword arguments that make it tiny. Where a family has dense
# layers or shared experts, the tiny model keeps them (layer 0 dense, layer 1 MoE) so that every parameter
# group is exercised.
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=_EXPERTS)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=_EXPERTS, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, num_experts=_EXPERTS, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=_EXPERTS)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=_EXPERTS, n_shared_experts=1,
        first_k_dense_replace=1, num_key_value_heads=_HEADS, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16, n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=_EXPERTS, n_shared_experts=1,
        first_k_dense_replace=1, num_key_value_heads=_HEADS, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16, n_group=1, topk_group=1)),
    "gpt_oss": ("GptOssConfig", dict(
        intermediate_size=32, num_local_experts=_EXPERTS, head_dim=16, sliding_window=32, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"])),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=32, num_local_experts=_EXPERTS)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(
        intermediate_size=32, num_local_experts=_EXPERTS, shared_intermediate_size=32)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=_EXPERTS)),
    "glm4_moe": ("Glm4MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=_EXPERTS, n_shared_experts=1,
        first_k_dense_replace=1, head_dim=16, n_group=1, topk_group=1)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, moe_num_experts=_EXPERTS, moe_k=_TOP_K,
        moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=False)),
    "minimax": ("MiniMaxConfig", dict(
        intermediate_size=32, num_local_experts=_EXPERTS, head_dim=16, block_size=16,
        layer_types=["linear_attention", "full_attention"])),
    "jamba": ("JambaConfig", dict(
        intermediate_size=32, num_experts=_EXPERTS, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8)),
    "qwen3_next": ("Qwen3NextConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=_EXPERTS,
        head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=32, num_experts=_EXPERTS)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=32, num_experts=_EXPERTS, moe_topk=_TOP_K, head_dim=16)),
    "llama4_text": ("Llama4TextConfig", dict(
        intermediate_size=32, intermediate_size_mlp=64, num_local_experts=_EXPERTS, head_dim=16,
        interleave_moe_layer_step=2, attention_chunk_size=64)),
    "dbrx": ("DbrxConfig", dict(
        d_model=_HIDDEN, n_heads=_HEADS, n_layers=_LAYERS, max_seq_len=512,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": _KV_HEADS, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": _EXPERTS, "moe_top_k": _TOP_K})),
    "jetmoe": ("JetMoeConfig", dict(
        num_key_value_heads=_KV_HEADS, kv_channels=16, intermediate_size=32, num_local_experts=_EXPERTS,
        tie_word_embeddings=False)),
}
TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)

# Keys every family but dbrx takes (dbrx nests its sizes in attn_config / ffn_config).
_COMMON = dict(
    hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS,
    num_experts_per_tok=_TOP_K, max_position_embeddings=512, tie_word_embeddings=False,
)


def tiny_config(arch: str, vocab_size: int = TOKENIZER_VOCAB_SIZE, **overrides: Any):
    """The config of a tiny model of family `arch`; `overrides` replace any config field (e.g. hidden_size=128)."""
    import transformers

    if arch not in _ARCHS:
        raise MoetuneError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(TINY_ARCHS)}")
    class_name, kwargs = _ARCHS[arch]
    common = {} if arch == "dbrx" else dict(_COMMON)
    if arch == "jetmoe":  # JetMoE derives heads from kv_channels and has no num_attention_heads field
        common.pop("num_attention_heads")
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=5)  # <pad>, <s>, <|im_end|> in build_tokenizer()
    return getattr(transformers, class_name)(**{**common, **kwargs, **special, "vocab_size": vocab_size, **overrides})


def make_tiny(arch: str, out_dir: str | Path, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random-weight model of family `arch` and a local tokenizer to `out_dir`.

    Args:
        arch: one of `TINY_ARCHS`.
        out_dir: directory to write (created; existing model files are replaced).
        seed: weight initialisation seed (the same seed gives the same weights).
        **config_overrides: config fields to change, e.g. `hidden_size=128, num_hidden_layers=4`.

    Returns:
        The directory, loadable by `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "moetune_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "overrides": config_overrides}, indent=2))
    return out
