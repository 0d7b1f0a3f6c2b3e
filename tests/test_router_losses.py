"""Router losses: aux equals transformers' own loss where the model has one, follows sigmoid scoring where it
does not, ignores padding; z-loss matches a hand computation; router logits are captured through hooks."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moetune.architectures import describe_moe
from moetune.router_capture import RouterCapture
from moetune.router_losses import load_balancing_loss, router_z_loss
from moetune.tiny import tiny_config


def _model(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _batch():
    ids = torch.randint(6, 300, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe"])
def test_aux_equals_the_models_own_loss(arch):
    model = _model(arch)
    info = describe_moe(model)
    ids, mask = _batch()
    with RouterCapture(model) as capture, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        aux, _ = capture.losses(info.num_experts, info.top_k, info.router_scoring)
        _, logits, _ = capture.ordered()
    torch.testing.assert_close(aux, out.aux_loss.float(), rtol=1e-6, atol=0)
    # and the hooks captured exactly what the model returns as router_logits
    assert len(logits) == len(out.router_logits)
    for ours, theirs in zip(logits, out.router_logits):
        assert torch.equal(ours, theirs)
    reference = load_balancing_loss_func(tuple(logits), info.num_experts, info.top_k, mask)
    torch.testing.assert_close(load_balancing_loss(logits, info.num_experts, info.top_k, token_mask=mask), reference)


def test_sigmoid_aux_by_hand():
    torch.manual_seed(3)
    logits = [torch.randn(7, 4), torch.randn(7, 4)]
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    ours = load_balancing_loss(logits, 4, 2, scoring="sigmoid", token_mask=mask)
    slots, probs, rows = [0.0] * 4, [0.0] * 4, 0
    for layer in logits:
        for t in range(7):
            if not mask[t]:
                continue
            s = [1 / (1 + math.exp(-float(x))) for x in layer[t]]
            p = [v / sum(s) for v in s]
            for e in sorted(range(4), key=lambda e: -p[e])[:2]:
                slots[e] += 1
            probs = [a + b for a, b in zip(probs, p)]
            rows += 1
    expected = 4 * sum((slots[e] / rows) * (probs[e] / rows) for e in range(4))
    assert float(ours) == pytest.approx(expected, rel=1e-6)


def test_aux_uses_the_experts_the_model_chose():
    logits = [torch.tensor([[3.0, 2.0, 1.0, 0.0]])]
    by_logits = load_balancing_loss(logits, 4, 1)
    chosen = load_balancing_loss(logits, 4, 1, top_k_index=[torch.tensor([[3]])])
    probs = logits[0].softmax(-1)[0]
    assert float(by_logits) == pytest.approx(4 * float(probs[0]))
    assert float(chosen) == pytest.approx(4 * float(probs[3]))


def test_z_loss_by_hand():
    torch.manual_seed(4)
    logits = [torch.randn(5, 4) * 3, torch.randn(5, 4) * 3]
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    values = [math.log(sum(math.exp(float(x)) for x in layer[t])) ** 2 for layer in logits for t in range(5) if mask[t]]
    assert float(router_z_loss(logits, token_mask=mask)) == pytest.approx(sum(values) / len(values), rel=1e-6)
    everything = [math.log(sum(math.exp(float(x)) for x in layer[t])) ** 2 for layer in logits for t in range(5)]
    assert float(router_z_loss(logits)) == pytest.approx(sum(everything) / len(everything), rel=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_padding_does_not_change_aux_or_z(arch):
    """Aux/z of a padded batch == aux/z of the real tokens alone, whatever the padding holds."""
    model = _model(arch)
    info = describe_moe(model)
    a = torch.randint(6, 300, (1, 5), generator=torch.Generator().manual_seed(5))
    b = torch.randint(6, 300, (1, 9), generator=torch.Generator().manual_seed(6))
    with RouterCapture(model) as capture, torch.no_grad():
        real = []
        for ids in (a, b):
            model(input_ids=ids)
            real.append(capture.ordered()[1])
        logits = [torch.cat([real[0][i], real[1][i]]) for i in range(len(real[0]))]
        expected_aux = load_balancing_loss(logits, info.num_experts, info.top_k, scoring=info.router_scoring)
        expected_z = router_z_loss(logits)
        for pad in (0, 123):
            ids = torch.full((2, 9), pad)
            ids[0, :5], ids[1] = a[0], b[0]
            mask = torch.zeros_like(ids)
            mask[0, :5], mask[1] = 1, 1
            model(input_ids=ids, attention_mask=mask)
            aux, z = capture.losses(info.num_experts, info.top_k, info.router_scoring)
            torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(z, expected_z, rtol=1e-5, atol=1e-6)


def test_losses_reach_only_the_routers_and_recompute_is_ignored():
    model = _model("qwen3_moe").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info = describe_moe(model)
    ids, mask = _batch()
    with RouterCapture(model) as capture:
        model(input_ids=ids, attention_mask=mask)
        aux, z = capture.losses(info.num_experts, info.top_k, info.router_scoring)
        recorded = dict(capture.logits)
        (aux + z).backward()
        assert capture.logits == recorded  # backward recomputation did not record again
    for name, param in model.named_parameters():
        is_router = ".mlp.gate." in name
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        if is_router:
            assert has_grad, name
        elif ".layers.1.mlp.experts." in name or "lm_head" in name or "model.norm" in name:
            assert not has_grad, name  # nothing downstream of the last router gets a gradient from router losses
