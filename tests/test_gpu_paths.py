"""The CUDA side of the routed-experts path, for a session with a GPU: `.venv/bin/python -m pytest -m gpu`.

The CPU tests cover the same functions on CPU; on CUDA other code runs: torch's grouped_mm kernel (SM80+), the
bitsandbytes dequantize op instead of the CPU workspace decode, torch's device generator for dropout masks.
"""

import pytest
import torch
from grad_checks import assert_same_step, randomize_lora

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


def _close(actual, expected):
    # bf16 on both sides; a mispaired expert would be off by a whole expert's output.
    expected = expected.float()
    torch.testing.assert_close(actual.float(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))


def _ids():
    return torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()


def test_4bit_routed_experts_on_cuda_equal_the_dequantize_everything_path(tiny_model_dir):
    from moetune.quantized_experts import remove_quantized_forward

    model = add_adapters(_load_4bit(tiny_model_dir("qwen3_moe")), LoraSection(r=4, targets=["attention"]))
    assert next(model.parameters()).device.type == "cuda"  # 4-bit loads onto the current device
    randomize_lora(model)

    def to_dequantize_everything(model):
        assert remove_quantized_forward(model) == 2

    assert_same_step(model.train(), _ids(), to_dequantize_everything, _close)


def test_split_expert_lora_on_cuda_equals_peft_fold(tiny_model_dir):
    from moetune.expert_lora import remove_split_lora

    model = add_adapters(_load_4bit(tiny_model_dir("mixtral")),
                         LoraSection(r=4, targets=["experts"], experts_path="split"))
    randomize_lora(model)

    def to_peft_fold(model):
        assert remove_split_lora(model) == 2

    assert_same_step(model.train(), _ids(), to_peft_fold, _close)
