"""The CUDA side of the routed-experts path, for a session with a GPU: `.venv/bin/python -m pytest -m gpu`.

The CPU tests cover the same functions on CPU; on CUDA other code runs: torch's grouped_mm kernel (SM80+), the
bitsandbytes dequantize op instead of the CPU workspace decode, torch's device generator for dropout masks.
"""

import pytest
import torch
from grad_checks import forward_backward, randomize_lora

from moetune.adapters import add_adapters
from moetune.config import LoraSection, ModelSection, QuantizationSection
from moetune.dropout_masks import keep_mask
from moetune.grouped_matmul import gmm
from moetune.loading import load_model


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gmm_on_cuda_gives_every_group_its_own_rows(dtype):
    counts = [37, 0, 5, 90, 1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 64, generator=gen).to("cuda", dtype)
    w = torch.randn(len(counts), 64, 48, generator=gen).to("cuda", dtype)
    out = gmm(x, w, torch.tensor(counts, device="cuda").cumsum(0, dtype=torch.int32), counts)
    ref = torch.cat([rows.float() @ w[g].float() for g, rows in enumerate(x.split(counts)) if rows.shape[0]])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # TF32 may be on for fp32 matmuls
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_keep_mask_on_cuda_is_reproducible_with_the_right_rate():
    mask = keep_mask((1000, 1000), 0.1, seed=5, device="cuda")
    assert mask.device.type == "cuda" and mask.dtype == torch.bool
    assert torch.equal(keep_mask((1000, 1000), 0.1, seed=5, device="cuda"), mask)
    assert not torch.equal(keep_mask((1000, 1000), 0.1, seed=6, device="cuda"), mask)
    assert float(mask.float().mean()) == pytest.approx(0.9, abs=2e-3)


def _load_4bit(path):
    return load_model(ModelSection(name_or_path=str(path), dtype="bfloat16"), QuantizationSection(),
                      with_tokenizer=False)[0]


def _close(a, b):
    # bf16 on both sides; a mispaired expert would be off by a whole expert's output.
    torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * float(b.float().abs().max()))


def test_4bit_routed_experts_on_cuda_equal_the_dequantize_everything_path(tiny_model_dir):
    from moetune.quantized_experts import remove_quantized_forward

    model = add_adapters(_load_4bit(tiny_model_dir("qwen3_moe")), LoraSection(r=4, targets=["attention"]))
    assert next(model.parameters()).device.type == "cuda"  # 4-bit loads onto the current device
    randomize_lora(model)
    model.train()
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    logits, d_embeds, grads = forward_backward(model, ids)
    assert remove_quantized_forward(model) == 2
    ref_logits, ref_d_embeds, ref_grads = forward_backward(model, ids)
    _close(logits, ref_logits)
    _close(d_embeds, ref_d_embeds)
    for name, grad in grads.items():
        assert ref_grads[name].abs().sum() > 0, name
        _close(grad, ref_grads[name])


def test_split_expert_lora_on_cuda_equals_peft_fold(tiny_model_dir):
    from moetune.expert_lora import install_split_lora

    model = add_adapters(_load_4bit(tiny_model_dir("mixtral")),
                         LoraSection(r=4, targets=["experts"], experts_path="peft"))
    randomize_lora(model)
    model.train()
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    logits, _, grads = forward_backward(model, ids)
    assert install_split_lora(model) == 2
    split_logits, _, split_grads = forward_backward(model, ids)
    _close(split_logits, logits)
    assert set(split_grads) == set(grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        _close(split_grads[name], grad)
