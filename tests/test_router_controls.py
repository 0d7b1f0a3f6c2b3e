"""Router controls: expert dropout (eager, grouped_mm, 4-bit experts, custom gates), router jitter on the router
input only, fp32 routers under bf16 autocast; all training-only, removable, and idempotent."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moetune.architectures import find_moe_layers
from moetune.config import MoESection
from moetune.errors import MoetuneError
from moetune.router_capture import RouterCapture
from moetune.router_controls import apply_router_controls
from moetune.tiny import tiny_config


def _model(arch="mixtral", impl="eager", dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, experts_implementation=impl), dtype=dtype)


IDS = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model, train: bool):
    model.train(train)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _quantize_experts(model):
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for layer in find_moe_layers(model):
        replace_parameter_4bit(layer.experts, "gate_up_proj")
        replace_parameter_4bit(layer.experts, "down_proj")


@pytest.mark.parametrize("arch,impl,four_bit", [
    ("mixtral", "eager", False), ("mixtral", "grouped_mm", False), ("qwen3_moe", "grouped_mm", False),
    ("gpt_oss", "eager", False), ("gpt_oss", "grouped_mm", False),  # gpt-oss: its own _apply_gate, no act_fn
    ("mixtral", "eager", True), ("mixtral", "grouped_mm", True),
])
def test_expert_dropout_train_only(arch, impl, four_bit):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    model = _model(arch, impl)
    if four_bit:
        _quantize_experts(model)
    eval_before, train_before = _logits(model, False), _logits(model, True)
    assert torch.equal(train_before, _logits(model, True))  # no other randomness in train mode
    controls = apply_router_controls(model, MoESection(expert_dropout=0.5, router_fp32=False))
    assert torch.equal(_logits(model, False), eval_before)
    assert not torch.allclose(_logits(model, True), train_before, atol=1e-4)
    controls.remove()
    assert torch.equal(_logits(model, True), train_before)


def test_expert_dropout_zeroes_expert_activations_before_down_proj():
    """With p = 0.999 all 2 x 32 expert activations of a token are dropped with probability 0.999**64 = 0.94, and
    then the token's experts output (after down_proj) is exactly zero; in eval mode it never is."""
    model = _model("mixtral", "grouped_mm")
    layer = find_moe_layers(model)[0]
    outputs = []
    layer.experts.register_forward_hook(lambda m, a, out: outputs.append(out))
    apply_router_controls(model, MoESection(expert_dropout=0.999, router_fp32=False))
    _logits(model, True)
    _logits(model, False)
    train_out, eval_out = outputs
    zero_rows = lambda out: (out.abs().sum(dim=-1) == 0).float().mean()  # noqa: E731
    assert zero_rows(train_out) > 0.8 and zero_rows(eval_out) == 0


def test_router_jitter_reaches_the_router_only():
    model = _model("mixtral")
    layer = find_moe_layers(model)[0]
    seen = {}
    layer.router.register_forward_pre_hook(lambda m, args: seen.__setitem__("router_in", args[0].detach().clone()))
    layer.experts.register_forward_pre_hook(lambda m, args: seen.__setitem__("experts_in", args[0].detach().clone()))
    layer.router.register_forward_hook(lambda m, args, out: seen.__setitem__("logits", out[0].detach().clone()))
    eval_before = _logits(model, False)
    apply_router_controls(model, MoESection(router_jitter=0.2, router_fp32=False))
    _logits(model, True)
    clean = seen["router_in"].reshape(-1, seen["router_in"].shape[-1])
    assert torch.equal(seen["experts_in"], clean)  # the experts get the un-noised hidden states
    assert not torch.allclose(seen["logits"], F.linear(clean, layer.router.weight), atol=1e-4)  # the router does not
    assert torch.equal(_logits(model, False), eval_before)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "llama4_text", "dbrx", "jetmoe"])
def test_router_fp32_under_bf16_autocast(arch):
    model = _model(arch, "eager", torch.bfloat16)
    layers = find_moe_layers(model)
    capture = RouterCapture(model)
    controls = apply_router_controls(model, MoESection(router_fp32=True, expert_dropout=0.1, router_jitter=0.01))
    assert all(p.dtype == torch.float32 for layer in layers for p in layer.router.parameters())
    assert type(layers[0].router).__name__.endswith(("Router", "Gate", "Gating"))  # class kept
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for layer in layers for p in layer.router.parameters())
    if arch != "dbrx":  # dbrx's block consumes the logits directly; they are rounded back after the fp32 matmul
        assert all(logits.dtype == torch.float32 for logits in capture.ordered()[1])
    controls.remove()
    assert all(p.dtype == torch.bfloat16 for layer in layers for p in layer.router.parameters())


def test_router_logits_still_recorded_and_applying_twice_replaces():
    model = _model("qwen3_moe")
    apply_router_controls(model, MoESection(expert_dropout=0.1, router_jitter=0.1))
    apply_router_controls(model, MoESection(expert_dropout=0.1, router_jitter=0.1))
    experts = find_moe_layers(model)[0].experts
    assert len(experts.act_fn._forward_hooks) == 1
    out = model(input_ids=IDS, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.aux_loss is not None


def test_expert_dropout_without_activation_is_an_error():
    model = _model("mixtral")
    for layer in find_moe_layers(model):
        del layer.experts.act_fn
    with pytest.raises(MoetuneError, match="moe.expert_dropout.*MixtralExperts"):
        apply_router_controls(model, MoESection(expert_dropout=0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_statistics(dtype):
    from moetune.router_controls import _dropout

    x = torch.ones(1_000_000, dtype=dtype)
    torch.manual_seed(0)
    out = _dropout(x, 0.1, training=True)
    assert out.dtype == dtype
    kept = out != 0
    assert float(kept.float().mean()) == pytest.approx(0.9, abs=2e-3)
    assert float(out.float().mean()) == pytest.approx(1.0, abs=5e-3)  # inverted dropout keeps the expectation
    assert torch.unique(out[kept].float()).numel() == 1  # one scale for every kept value
    torch.manual_seed(0)
    assert torch.equal(_dropout(x, 0.1, training=True), out)  # reproducible under the global seed
    assert _dropout(x, 0.1, training=False) is x


@pytest.mark.parametrize("arch", ["mixtral", "ernie4_5_moe"])
def test_router_trained_in_full_beside_lora_is_the_one_that_runs(arch):
    """PEFT's modules_to_save deep-copies the router after the fp32 control is on: the copy must run (and train)."""
    from moetune.adapters import add_adapters
    from moetune.config import FreezeSection, LoraSection
    from moetune.freezing import freeze, modules_trained_in_full

    model = _model(arch)
    apply_router_controls(model, MoESection(router_fp32=True))  # as load_model does
    train = FreezeSection(train=["router"])
    model = add_adapters(model, LoraSection(r=2, targets=["attention"]), modules_to_save=modules_trained_in_full(model, train))
    freeze(model, train, lora_enabled=True)
    apply_router_controls(model, MoESection(router_fp32=True))  # and again, as MoETrainer does
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    copies = [p for n, p in model.named_parameters() if ".modules_to_save.default." in n and n.endswith("weight")]
    assert copies and all(p.grad is not None and p.grad.abs().sum() > 0 for p in copies)
    before = _logits(model, train=False)
    with torch.no_grad():
        for p in copies:
            p.mul_(-1.0)
    assert not torch.equal(_logits(model, train=False), before)
