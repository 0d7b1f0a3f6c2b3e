"""LoRA by group on 4-bit MoE models: what trains, what it computes, and how it reloads."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, get_peft_model

from moetune._compat import fix_peft_param_wrappers, peft_param_wrapper_fix_needed
from moetune.adapters import add_adapters, load_adapter, resolve_targets
from moetune.architectures import canonical_name
from moetune.config import LoraSection, ModelSection, QuantizationSection
from moetune.errors import MoetuneError
from moetune.loading import load_model


def _load(path, dtype="bfloat16", impl=None, quantized=True):
    section = ModelSection(name_or_path=str(path), dtype=dtype, experts_implementation=impl)
    return load_model(section, QuantizationSection() if quantized else None)[0]


def _lora_weights(model) -> dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]]:
    """(base module path, wrapped parameter name) -> (lora_A, lora_B), independent of wrapper nesting."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = (canonical_name(name), getattr(module, "parameter_name", None))
            out[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def _randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in _lora_weights(model).values():
            a.copy_(torch.randn(a.shape, generator=gen) * 0.05)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def _dequantized_reference(q_model, path, impl):
    """An unquantized fp32 model whose weights are exactly the 4-bit model's dequantized weights."""
    ref = _load(path, "float32", impl, quantized=False)
    modules = dict(q_model.named_modules())
    with torch.no_grad():
        for name, param in q_model.named_parameters():
            if ".lora_" in name:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = modules[owner_name]
            if isinstance(owner, Linear4bit) and attr == "weight":
                value = bnbF.dequantize_4bit(param.data, param.quant_state)
            elif ".parametrizations." in name:
                base_name, _, rest = name.partition(".parametrizations.")
                value = getattr(modules[base_name], rest.split(".")[0])
            else:
                value = param
            ref.get_parameter(canonical_name(name)).copy_(value)
    return ref


def _ids(n=2, t=12, seed=0):
    return torch.randint(6, 400, (n, t), generator=torch.Generator().manual_seed(seed))


def test_lora_on_attention_trains_only_lora(tiny_model_dir):
    model = add_adapters(_load(tiny_model_dir("mixtral")), LoraSection(r=4, targets=["attention"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    wrapped = {canonical_name(n) for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {w.rpartition(".")[2] for w in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(2):  # lora_A gets a gradient only once lora_B is non-zero (B starts at 0)
        ids = _ids(seed=step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
        else:
            assert not torch.equal(p, lora_before[n]), f"LoRA {n} did not change"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_lora_on_4bit_experts_equals_lora_on_dequantized(tiny_model_dir, impl):
    path = tiny_model_dir("mixtral")
    lora = LoraSection(r=4, targets=["experts", "attention"])
    model = add_adapters(_load(path, "float32", impl), lora)
    _randomize_lora(model)
    ref = add_adapters(_dequantized_reference(model.get_base_model(), path, impl), lora)
    ref_weights = _lora_weights(ref)
    with torch.no_grad():
        for key, (a, b) in _lora_weights(model).items():
            ref_weights[key][0].copy_(a)
            ref_weights[key][1].copy_(b)
    expert_keys = [k for k in ref_weights if k[1] is not None]
    assert len(expert_keys) == 4  # gate_up_proj and down_proj in both MoE layers
    ids = _ids()
    model.train()
    ref.train()
    out, ref_out = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-5, rtol=1e-5)
    again = model(ids, labels=ids)  # no LoRA delta piles up from one forward to the next
    torch.testing.assert_close(again.logits, out.logits, atol=0, rtol=0)
    out.loss.backward()
    ref_out.loss.backward()
    ref_weights = _lora_weights(ref)
    for key, (a, b) in _lora_weights(model).items():
        for mine, theirs in ((a, ref_weights[key][0]), (b, ref_weights[key][1])):
            assert mine.grad is not None and mine.grad.abs().sum() > 0, key
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    for key in expert_keys:  # 4-bit experts module never leaves a LoRA proxy behind
        module = model.get_base_model().get_submodule(key[0])
        while hasattr(module, "base_layer"):
            module = module.base_layer
        assert len(module.parametrizations[key[1]]) == 1


@pytest.mark.skipif(not peft_param_wrapper_fix_needed(), reason="upstream PEFT fixed; delete the patch")
def test_peft_param_wrapper_bugs_exist_unpatched_and_are_fixed(tiny_model_dir):
    """Canary: fails once PEFT no longer has the bugs, so `_compat.fix_peft_param_wrappers` can go."""
    targets = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    config = LoraConfig(r=4, target_modules=[], target_parameters=targets)

    def unpatched():
        model = get_peft_model(_load(tiny_model_dir("mixtral"), "float32", "eager"), config)
        _randomize_lora(model)
        return model

    ids = _ids()
    model = unpatched()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert not torch.equal(first, second)  # bug a: LoRA deltas pile up from one forward to the next
    model = unpatched()
    model(ids).logits.sum().backward()
    down = [a for (path, name), (a, _) in _lora_weights(model).items() if name == "down_proj"]
    assert down and all(a.grad is None for a in down)  # bug b: the inner wrapper's LoRA is ignored

    # The same on a fresh model with the fix applied.
    fresh = get_peft_model(_load(tiny_model_dir("mixtral"), "float32", "eager"),
                           LoraConfig(r=4, target_modules=[], target_parameters=targets))
    assert fix_peft_param_wrappers(fresh) == 4
    _randomize_lora(fresh)
    with torch.no_grad():
        first, second = fresh(ids).logits, fresh(ids).logits
    assert torch.equal(first, second)
    fresh(ids).logits.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a, _ in _lora_weights(fresh).values())


def test_adapter_reloads_onto_4bit_and_bf16_bases(tiny_model_dir, tmp_path):
    path = tiny_model_dir("mixtral")
    model = add_adapters(_load(path), LoraSection(r=4, targets=["experts", "attention", "router"]))
    _randomize_lora(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in _lora_weights(model).items()}

    reloaded = load_adapter(_load(path), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)
        again = reloaded(ids).logits
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())

    # A bf16 base nests the expert wrappers the other way round; the weights must land on the same parameters.
    on_bf16 = load_adapter(_load(path, quantized=False), tmp_path / "adapter")
    loaded = _lora_weights(on_bf16)
    assert set(loaded) == set(saved)
    for key, (a, b) in saved.items():
        assert torch.equal(loaded[key][0], a) and torch.equal(loaded[key][1], b), key
    # Same logits as the adapter placed on a bf16 base by (module, parameter) name, independently of load_adapter.
    reference = add_adapters(_load(path, quantized=False), LoraSection(r=4, targets=["experts", "attention", "router"]))
    with torch.no_grad():
        for key, (a, b) in _lora_weights(reference).items():
            a.copy_(saved[key][0])
            b.copy_(saved[key][1])
        reference.eval()
        torch.testing.assert_close(on_bf16(ids).logits, reference(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "llama4_text", "dbrx", "qwen2_moe"])
def test_router_lora_gets_gradients(tiny_model_dir, arch):
    model = add_adapters(_load(tiny_model_dir(arch)), LoraSection(r=4, targets=["router"]))
    _randomize_lora(model)
    weights = _lora_weights(model)
    assert weights
    ids = _ids()
    model.train()
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    for key, pair in weights.items():
        for weight in pair:
            assert weight.grad is not None and weight.grad.abs().sum() > 0, key


def test_deepseek_attention_targets_mla_projections(tiny_model_dir):
    model = _load(tiny_model_dir("deepseek_v3"))
    modules, params = resolve_targets(model, ["attention"])
    assert not params
    assert {m.rpartition(".")[2] for m in modules} == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                       "o_proj"}


def test_shared_and_dense_targets(tiny_model_dir):
    model = _load(tiny_model_dir("qwen2_moe"))
    shared, _ = resolve_targets(model, ["shared_experts"])
    dense, _ = resolve_targets(model, ["dense_mlp"])
    assert shared and all(".mlp.shared_expert" in m for m in shared)
    assert dense and all(m.startswith("model.layers.0.mlp.") for m in dense)


def test_explicit_names(tiny_model_dir):
    model = _load(tiny_model_dir("mixtral"))
    modules, params = resolve_targets(model, ["q_proj", "model.layers.1.mlp.experts.down_proj"])
    assert modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert params == ["model.layers.1.mlp.experts.down_proj"]
    peft_model = add_adapters(model, LoraSection(r=2, targets=["model.layers.1.mlp.experts.down_proj"]))
    assert len(_lora_weights(peft_model)) == 1


def test_target_errors_say_what_the_model_has(tiny_model_dir):
    model = _load(tiny_model_dir("mixtral"))
    with pytest.raises(MoetuneError, match=r"'shared_experts' matches nothing.*groups \['attention'"):
        add_adapters(model, LoraSection(targets=["shared_experts"]))
    with pytest.raises(MoetuneError, match=r"'qkv' matches nothing.*o_proj"):
        add_adapters(model, LoraSection(targets=["qkv"]))
    with pytest.raises(MoetuneError, match=r"lora.dropout.*must be 0.0.*got 0.1"):
        add_adapters(model, LoraSection(targets=["experts"], dropout=0.1))


def test_expert_lora_on_dbrx_is_refused_clearly(tiny_model_dir):
    from moetune.loading import load_model

    model, _ = load_model(str(tiny_model_dir("dbrx")))
    with pytest.raises(MoetuneError, match="LoRA on dbrx experts is not supported"):
        add_adapters(model, LoraSection(targets=["experts"]))
