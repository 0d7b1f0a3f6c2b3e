"""The architecture map: every parameter of every family lands in exactly one group, and the per-family facts
(experts, top-k, MoE layers, aux loss) agree with what the model actually does."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from moetune.architectures import (
    GROUPS,
    canonical_name,
    classify_parameters,
    describe_moe,
    find_moe_layers,
    group_parameters,
)
from moetune.errors import MoetuneError
from moetune.tiny import TINY_ARCHS


# Groups each tiny model must have besides embedding/attention/router/experts/norm/lm_head: the tiny configs keep
# a dense layer 0 and shared experts wherever the family has them, so every group is exercised somewhere.
EXTRA_GROUPS = {
    "qwen2_moe": {"dense_mlp", "shared_experts"},
    "deepseek_v2": {"dense_mlp", "shared_experts"},
    "deepseek_v3": {"dense_mlp", "shared_experts"},
    "glm4_moe": {"dense_mlp", "shared_experts"},
    "ernie4_5_moe": {"dense_mlp", "shared_experts"},
    "llama4_text": {"dense_mlp", "shared_experts"},
    "jamba": {"dense_mlp", "mamba"},
    "qwen3_next": {"shared_experts", "linear_attention"},
    "minimax": {"linear_attention"},
    "granitemoeshared": {"shared_experts"},
    "hunyuan_v1_moe": {"shared_experts"},
}
DENSE_FIRST_LAYER = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text", "jamba"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_parameter_lands_in_one_group(arch, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    groups = classify_parameters(model)

    assert set(groups) == {name for name, _ in model.named_parameters()}
    assert set(groups.values()) <= set(GROUPS)
    params = dict(model.named_parameters())
    counted = sum(params[name].numel() for names in group_parameters(model).values() for name in names)
    assert counted == sum(p.numel() for p in model.parameters())
    expected = {"embedding", "attention", "router", "experts", "norm", "lm_head"} | EXTRA_GROUPS.get(arch, set())
    if arch == "qwen3_next":  # its only full-attention layer is layer 1; layer 0 is linear attention
        expected |= {"attention"}
    assert set(groups.values()) == expected

    # Structural cross-checks: routers output one logit per expert; stacked expert weights have one slice per expert.
    info = describe_moe(model)
    for name, group in groups.items():
        if group == "router" and name.endswith("weight"):
            assert params[name].shape[0] == info.num_experts, name
        if group == "experts" and params[name].dim() == 3:
            assert params[name].shape[0] == info.num_experts, name


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_describe_moe_matches_the_model(arch, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    info = describe_moe(model)

    assert (info.num_experts, info.top_k) == (4, 2)
    assert info.moe_layers == ([1] if arch in DENSE_FIRST_LAYER else [0, 1])
    assert [layer.index for layer in find_moe_layers(model)] == info.moe_layers
    assert not info.guessed

    ids = torch.randint(6, model.config.vocab_size, (2, 8))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    # The table's claim about who computes the aux loss is what the model really does.
    assert (out.aux_loss is not None) == info.model_computes_aux_loss
    if info.model_computes_aux_loss:
        assert isinstance(getattr(model, info.aux_coef_attr), float)
    if arch != "jetmoe":  # JetMoE also records the routers of its mixture-of-attention heads
        assert len(out.router_logits) == len(info.moe_layers)
    assert info.uses_experts_implementation == (arch not in {"dbrx", "jetmoe", "llama4_text"})


def test_attention_projection_names_exist(tiny_model_dir):
    for arch in ("mixtral", "deepseek_v3", "dbrx", "minimax"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        info = describe_moe(model)
        assert set(info.attention_projections) - {"q_proj"} <= leaf_names, arch  # MLA has q_proj only without q_lora


def test_canonical_names_see_through_peft_and_parametrizations(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from torch.nn.utils import parametrize

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"), dtype=torch.float32)
    plain = classify_parameters(model)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    parametrize.register_parametrization(model.model.layers[0].mlp.experts, "down_proj", Identity())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = classify_parameters(peft_model)

    assert {canonical_name(n): g for n, g in wrapped.items() if g != "adapter"} == plain
    adapters = [n for n, g in wrapped.items() if g == "adapter"]
    assert adapters and all("lora_" in n for n in adapters)
    assert canonical_name("base_model.model.model.layers.0.mlp.experts.parametrizations.down_proj.original") == \
        "model.layers.0.mlp.experts.down_proj"


def test_unknown_moe_family_is_guessed_with_a_warning(caplog):
    config = MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)
    model.config.model_type = "mystery_moe"  # as a remote-code family would present itself

    with caplog.at_level(logging.WARNING, logger="moetune"):
        groups = classify_parameters(model)
        info = describe_moe(model)

    assert info.guessed and info.num_experts == 4 and info.moe_layers == [0, 1]
    assert "mystery_moe" in caplog.text and "guessed" in caplog.text
    assert groups["model.layers.0.mlp.gate.weight"] == "router"
    assert groups["model.layers.1.mlp.experts.gate_up_proj"] == "experts"
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "attention"


def test_dense_model_is_an_error():
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    with pytest.raises(MoetuneError, match="'llama' is not a Mixture-of-Experts model"):
        classify_parameters(AutoModelForCausalLM.from_config(config))
