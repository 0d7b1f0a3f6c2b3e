"""Split expert LoRA: the same function and gradients as PEFT's fold, expert by expert, in PEFT's own layout."""

import pytest
import torch
from grad_checks import forward_backward, randomize_lora
from peft import PeftModel

from moetune import grouped_experts
from moetune.adapters import add_adapters, load_adapter
from moetune.architectures import find_moe_layers
from moetune.config import LoraSection, ModelSection, QuantizationSection, load_recipe
from moetune.errors import MoetuneError
from moetune.expert_lora import install_split_lora, is_split, remove_split_lora
from moetune.loading import load_model
from moetune.router_capture import innermost_module


def _load(path, quantized=False):
    return load_model(ModelSection(name_or_path=str(path), dtype="float32"), QuantizationSection() if quantized else None,
                      with_tokenizer=False)[0]


def _expert_wrappers(model):
    """(name, wrapper) for every ParamWrapper on a fused expert weight."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "parameter_name", None) in ("gate_up_proj", "down_proj")]


def _ids(seed=0):
    return torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    # fp32; the fold and the split path associate the same products differently, so allow rounding at 1e-5 of
    # the tensor's scale (a mispaired expert would be off by the whole LoRA term, ~1e-1 here).
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("runs", ["one_run", "runs"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_split_equals_peft_fold_expert_by_expert(tiny_model_dir, arch, quantized, runs, monkeypatch):
    if runs == "runs":  # runs of at most T pairs: 32 tokens x top-2 in 2+ runs per projection
        monkeypatch.setattr(grouped_experts, "ROUTED_CHUNK_BYTES", 0)
    model = add_adapters(_load(tiny_model_dir(arch), quantized), LoraSection(r=4, targets=["experts"], experts_path="peft"))
    assert not is_split(model)
    randomize_lora(model)
    model.train()
    ids = _ids()
    logits, d_embeds, grads = forward_backward(model, ids)
    assert install_split_lora(model) == 2 and is_split(model)
    split_logits, split_d_embeds, split_grads = forward_backward(model, ids)
    assert _close(split_logits, logits), (split_logits - logits).abs().max()
    assert _close(split_d_embeds, d_embeds)
    checked = 0
    for name, wrapper in _expert_wrappers(model):
        experts, r = wrapper.num_experts, wrapper.r["default"]
        prefix = f"{name}.lora_"
        grad_a = split_grads[f"{prefix}A.default.weight"]
        grad_b = split_grads[f"{prefix}B.default.weight"]
        ref_a, ref_b = grads[f"{prefix}A.default.weight"], grads[f"{prefix}B.default.weight"]
        for e in range(experts):
            # PEFT's blocks: expert e owns rows e*r:(e+1)*r of lora_A and columns e, e+E, ... of lora_B.
            a_rows, b_cols = slice(e * r, (e + 1) * r), slice(e, None, experts)
            assert ref_a[a_rows].abs().sum() > 0 and ref_b[:, b_cols].abs().sum() > 0, (name, e)
            assert _close(grad_a[a_rows], ref_a[a_rows]), (name, e)
            assert _close(grad_b[:, b_cols], ref_b[:, b_cols]), (name, e)
            checked += 1
    assert checked == 2 * 2 * 4  # 2 layers x (gate_up_proj, down_proj) x 4 experts
    assert set(split_grads) == set(grads)
    remove_split_lora(model)
    assert not is_split(model) and _close(forward_backward(model, ids)[0], logits)


def test_add_adapters_follows_experts_path(tiny_model_dir):
    path = tiny_model_dir("mixtral")
    assert is_split(add_adapters(_load(path), LoraSection(r=4, targets=["experts"], experts_path="split")))
    assert not is_split(add_adapters(_load(path), LoraSection(r=4, targets=["experts"], experts_path="peft")))
    # auto: split on every layout it supports, coarse ones too (AUTO_MIN_EXPERTS, measured).
    assert is_split(add_adapters(_load(path), LoraSection(r=4, targets=["experts"])))
    # Dropout on expert LoRA needs split, said explicitly.
    for experts_path in ("peft", "auto"):
        with pytest.raises(MoetuneError, match=r"lora.dropout.*unless `lora.experts_path: split`"):
            add_adapters(_load(path), LoraSection(r=4, targets=["experts"], dropout=0.1, experts_path=experts_path))


def test_dropout_only_in_training_and_only_when_configured(tiny_model_dir):
    path = tiny_model_dir("qwen3_moe")
    lora = LoraSection(r=4, targets=["experts", "attention"], experts_path="split")
    plain = add_adapters(_load(path), lora)
    dropped = add_adapters(_load(path), lora.model_copy(update={"dropout": 0.3}))
    for model in (plain, dropped):
        randomize_lora(model)
    ids = _ids()
    torch.manual_seed(0)
    with torch.no_grad():
        plain.eval(), dropped.eval()
        reference = plain(ids).logits
        assert torch.equal(dropped(ids).logits, reference) and torch.equal(dropped(ids).logits, reference)
        plain.train(), dropped.train()
        assert torch.equal(plain(ids).logits, reference)
        first, second = dropped(ids).logits, dropped(ids).logits
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    # Attention LoRA (Linear) got the same dropout; the saved config keeps 0 so plain PEFT can load it.
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in dropped.modules())
    assert dropped.peft_config["default"].lora_dropout == 0.0


def test_saved_adapter_is_peft_layout_and_reloads_identically(tiny_model_dir, tmp_path):
    path = tiny_model_dir("mixtral")
    model = add_adapters(_load(path), LoraSection(r=4, targets=["experts", "attention"], experts_path="split"))
    randomize_lora(model)
    model.eval()
    ids = _ids(1)
    with torch.no_grad():
        logits = model(ids).logits
        with model.disable_adapter():  # PEFT's switch still works: the split forward hands over to PEFT's
            assert torch.equal(model(ids).logits, _load(path)(ids).logits)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(_load(path), str(tmp_path / "adapter")).eval()  # PEFT's own fold
    assert not is_split(plain)
    reloaded = load_adapter(_load(path), tmp_path / "adapter", experts_path="split")
    assert is_split(reloaded)
    with torch.no_grad():
        assert _close(plain(ids).logits, logits)
        assert torch.equal(reloaded(ids).logits, logits)


def test_expert_mask_turns_lora_off_for_unchosen_experts(tiny_model_dir):
    model = add_adapters(_load(tiny_model_dir("mixtral")), LoraSection(r=4, targets=["experts"], experts_path="peft"))
    randomize_lora(model)
    model.train()
    ids = _ids()
    install_split_lora(model, expert_mask=[True, False, True, True])
    logits, _, grads = forward_backward(model, ids)
    remove_split_lora(model)
    with torch.no_grad():  # the same as PEFT's fold with expert 1's LoRA zeroed
        for _, wrapper in _expert_wrappers(model):
            wrapper.lora_B["default"].weight[:, 1::4] = 0
    assert _close(forward_backward(model, ids)[0], logits)
    for name, _ in _expert_wrappers(model):
        assert grads[f"{name}.lora_A.default.weight"][4:8].abs().sum() == 0
        assert grads[f"{name}.lora_B.default.weight"][:, 1::4].abs().sum() == 0
        assert grads[f"{name}.lora_A.default.weight"][0:4].abs().sum() > 0
    with pytest.raises(MoetuneError, match="expert_mask has 3 entries"):
        install_split_lora(model, expert_mask=[True, False, True])


def test_unsupported_layouts_are_refused_clearly(tiny_model_dir):
    path = tiny_model_dir("gpt_oss")
    with pytest.raises(MoetuneError, match=r"split expert-LoRA path does not support GptOssExperts.*transposed.*bias"):
        add_adapters(_load(path), LoraSection(r=4, targets=["experts"], experts_path="split"))
    assert not is_split(add_adapters(_load(path), LoraSection(r=4, targets=["experts"], dropout=0.0)))


def test_recipe_allows_expert_dropout_only_with_split(tmp_path, monkeypatch):
    from moetune.errors import RecipeError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    recipe = {"model": {"name_or_path": "org/some-moe"}, "data": {"train": "train.jsonl"}, "output": {"dir": "out"},
              "lora": {"targets": ["experts"], "dropout": 0.05, "experts_path": "split"}}
    assert load_recipe(recipe).lora.experts_path == "split"
    recipe["lora"]["experts_path"] = "peft"
    with pytest.raises(RecipeError, match=r"`lora.dropout` must be 0 when `lora.targets` includes experts"):
        load_recipe(recipe)


def test_gradient_checkpointing_replays_the_same_dropout(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(grouped_experts, "ROUTED_CHUNK_BYTES", 0)  # several runs, each with its own mask
    model = add_adapters(_load(tiny_model_dir("qwen3_moe"), quantized=True),
                         LoraSection(r=4, targets=["experts", "attention"], experts_path="split", dropout=0.2))
    randomize_lora(model)
    model.train()
    ids = _ids()

    def grads():
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert all(plain[n].abs().sum() > 0 and torch.equal(plain[n], checkpointed[n]) for n in plain)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_no_tensor_of_every_routed_pair_by_hidden_size_is_built_or_kept(tiny_model_dir, quantized, monkeypatch):
    # The routing plumbing (gathered inputs, their gradient, the expert outputs before the combine, the unsort)
    # stays a run of experts wide: runs of at most T pairs here, so no [T*k, H] tensor may appear in backward,
    # nor be saved by the forward. T*k = 48 x 4 = 192 rows of H = 64: a shape nothing else in the model has.
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(grouped_experts, "ROUTED_CHUNK_BYTES", 0)
    path = tiny_model_dir("qwen3_moe", num_experts=8, num_experts_per_tok=4, moe_intermediate_size=24)  # 2I != H
    model = add_adapters(_load(path, quantized), LoraSection(r=4, targets=["experts"], experts_path="split", dropout=0.1))
    randomize_lora(model)
    model.train()
    ids = torch.randint(6, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    pairs_by_hidden = (2 * 24 * 4, model.config.hidden_size)

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    saved, forward = [], Shapes()
    with forward, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(ids, labels=ids).loss
    assert find_moe_layers(model)[0].experts.num_experts == 8 and pairs_by_hidden[0] > 48
    assert pairs_by_hidden not in saved
    backward = Shapes()
    with backward:
        loss.backward()
    assert backward.seen and pairs_by_hidden not in backward.seen
    experts_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "experts" in n]
    assert experts_grads and all(g is not None and g.abs().sum() > 0 for g in experts_grads)


def test_trainable_base_experts_still_get_their_gradient_under_split_lora(tiny_model_dir):
    # The split Functions never give the base expert weight a gradient; when a recipe trains it too (freezing
    # presets on top of expert LoRA), the forward must be PEFT's fold, not a silently frozen base.
    model = add_adapters(_load(tiny_model_dir("mixtral")), LoraSection(r=4, targets=["experts"], experts_path="split"))
    assert is_split(model)
    randomize_lora(model)
    base = [p for n, p in model.named_parameters() if n.endswith("experts.base_layer.base_layer.gate_up_proj")
            or n.endswith("experts.base_layer.gate_up_proj")]
    assert base
    for param in base:
        param.requires_grad_(True)
    model.train()
    model(input_ids=_ids()).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in base)


@pytest.mark.parametrize("experts", ["split_lora", "attention_qlora"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_default_gate_on_two_halves_equals_the_family_gate_on_one_tensor(tiny_model_dir, arch, experts, monkeypatch):
    """With transformers' default gate the grouped path hands `act_fn(gate) * up` two `[S, I]` tensors instead of
    the halves of one `[S, 2I]`: the same logits and gradients, expert dropout (a hook on `act_fn`) included."""
    from grad_checks import assert_same_step

    from moetune.config import MoESection
    from moetune.router_controls import apply_router_controls

    quantized = experts == "attention_qlora"
    targets = {"targets": ["attention"]} if quantized else {"targets": ["experts"], "experts_path": "split"}
    model = add_adapters(_load(tiny_model_dir(arch), quantized), LoraSection(r=4, **targets))
    randomize_lora(model)
    apply_router_controls(model, MoESection(expert_dropout=0.3))
    layers = find_moe_layers(model)
    assert all(grouped_experts._default_gate(innermost_module(layer.experts)) for layer in layers)
    blocks = []
    real = grouped_experts.make_projection
    monkeypatch.setattr(grouped_experts, "make_projection",
                        lambda *a, **k: blocks.append(len((p := real(*a, **k)).blocks)) or p)

    def to_one_tensor(model):
        assert blocks.count(2) == len(layers)  # the first pass did take the two halves, once per layer
        monkeypatch.setattr(grouped_experts, "_default_gate", lambda experts: False)
        torch.manual_seed(0)  # the same dropout masks as the first pass

    torch.manual_seed(0)
    assert_same_step(model.train(), _ids(), to_one_tensor,
                     lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())))
