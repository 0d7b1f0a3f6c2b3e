"""Fold a LoRA run into a plain checkpoint that serving engines load, and check that the fold changed nothing.

    moetune merge runs/my-run runs/my-run-merged --dtype bfloat16

Every LoRA (attention, router, shared experts, fused-expert `target_parameters`) and every module trained in full
(`modules_to_save`) goes into the weights through PEFT's `merge_and_unload`. A 4-bit base is never merged into:
the base is loaded unquantized in the target dtype with the *dequantized* 4-bit weights, i.e. exactly the weights
the adapter was trained against, so the merged model computes what the trained model computed (a QLoRA adapter
merged into the original full-precision weights would instead carry the quantization error as a shift).
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moetune.errors import MoetuneError


if TYPE_CHECKING:
    import torch


MERGE_DTYPES = ("bfloat16", "float32", "float16")
# The check: the median over tokens of each token's relative logit error, max|merged - unmerged| / max|unmerged|.
# The median, not the max: top-k routing is discrete, and a perturbation at rounding level flips near-tied expert
# choices, which moves that token's logits by O(1) even when the merge is exact (tiny bf16 models: max up to 0.8
# relative, median at rounding level). A real mistake (a skipped attention / expert LoRA, a misplaced expert delta,
# a lost router trained in full) moves every token: medians 0.26-1.4 relative, measured on six families.
# fp32: merged and unmerged differ by reordered float32 additions: medians <= 5e-7, max <= 2.2e-5 measured, so 1e-4
#   is far above rounding and far below any mistake.
# bf16 / fp16: merging rounds W + s*B@A to the dtype once where the unmerged model rounds W and the LoRA branch
#   separately: medians 0.4-1.5 x the dtype's epsilon (2^-7 bf16, 2^-10 fp16) over six families x every adapter
#   kind x 4-bit bases, and up to 3.6 epsilon on deeper tiny models (8-32 layers). The bound is 8 epsilon (bf16
#   6.3e-2, fp16 7.8e-3). An adapter whose whole effect is that small (a barely trained router LoRA measured
#   0.03-0.05) cannot be told from bf16 rounding: merge in float32 to check such an adapter exactly.
TOLERANCE = {"float32": 1e-4, "bfloat16": 8 * 2.0**-7, "float16": 8 * 2.0**-10}
SAMPLE_ROWS = 4
SAMPLE_TOKENS = 128
FALLBACK_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer:",
    "def add(a, b):\n    return a + b",
    "A mixture of experts routes each token to a few experts.",
)
# Files of the run that describe how the merged weights came about; copied beside them (serving engines ignore them).
RUN_RECORDS = ("recipe.yaml", "metrics.json", "data_report.json", "routing.json", "routing.png")
MERGE_REPORT = "merge_report.json"


@dataclass
class MergeReport:
    """How far the merged checkpoint's logits are from base + adapter (unmerged), same dtype, same rows."""

    dtype: str
    max_abs_error: float
    max_rel_error: float
    median_rel_error: float  # the checked quantity, see TOLERANCE
    tolerance: float
    tokens_above_tolerance: int  # routing flips, when the median is fine
    rows: int
    tokens: int
    sample_source: str

    @property
    def ok(self) -> bool:
        return self.median_rel_error <= self.tolerance

    def format_text(self) -> str:
        return (f"merged vs unmerged logits in {self.dtype} on {self.rows} rows / {self.tokens} tokens of "
                f"{self.sample_source}: median relative error {self.median_rel_error:.3g} (tolerance "
                f"{self.tolerance:.3g}), max relative error {self.max_rel_error:.3g}, max abs error "
                f"{self.max_abs_error:.3g}, {self.tokens_above_tolerance} token(s) above tolerance")


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> MergeReport:
    """Merge a LoRA run into a plain transformers checkpoint in `out_dir`, verified against the unmerged model.

    Writes the model (`save_pretrained`'s default layout), the tokenizer with its chat template, the run's records
    (recipe.yaml, metrics.json, routing files), merge_report.json and a model card. The checkpoint is written to a
    temporary directory beside `out_dir`, reloaded with plain `from_pretrained`, compared, and only then renamed
    to `out_dir`: on any failure `out_dir` does not appear.

    Args:
        run_dir: a LoRA run's output directory (adapter + recipe.yaml).
        out_dir: where to write the merged model; must not exist or be empty.
        dtype: one of `MERGE_DTYPES`.

    Returns:
        The verification report (also in `out_dir/merge_report.json`).

    Raises:
        MoetuneError: not an adapter run, `out_dir` not empty, or merged logits outside `TOLERANCE[dtype]`
            (the message gives the measured errors).
    """
    from moetune.adapters import load_adapter
    from moetune.loading import load_model
    from moetune.model_card import write_model_card
    from moetune.run_info import read_run_dir

    if dtype not in MERGE_DTYPES:
        raise MoetuneError(f"--dtype must be one of {', '.join(MERGE_DTYPES)} (got {dtype!r})")
    run = read_run_dir(run_dir)
    if not run.on_base:
        raise MoetuneError(f"nothing to merge: {run_dir} holds a full model, which serving engines load as it is")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoetuneError(f"{out_dir} already exists and is not empty: choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)

    section = run.model_section(dtype=dtype)
    # Unquantized, without moetune's fp32-router controls: the model as serving engines (and from_pretrained) see it.
    base, tokenizer = load_model(section, router_fp32=False)
    if run.quantization is not None:
        _copy_dequantized_weights(run, base)
    if run.tokenizer_source == str(run.path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(run.path))
    if run.is_expert_delta:  # full ESFT: the trained slices go into the base; nothing to fold
        from moetune.esft import load_esft

        model = load_esft(base, run.path)
    else:
        model = load_adapter(base, run.path)
    rows, source = sample_rows(run, tokenizer)
    reference = _logits(model, rows)
    merged = model if run.is_expert_delta else model.merge_and_unload()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, model, base  # one model in memory at a time
        reloaded, _ = load_model(section.model_copy(update={"name_or_path": str(tmp)}), router_fp32=False)
        report = _compare(reference, _logits(reloaded, rows), dtype, source)
        if not report.ok:
            raise MoetuneError(f"the merged model does not reproduce base + adapter: {report.format_text()}. "
                               f"Nothing was written to {out_dir}.")
        for name in RUN_RECORDS:
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, tmp / name)
        (tmp / MERGE_REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        write_model_card(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _copy_dequantized_weights(run, base) -> None:
    """Load the run's 4-bit base as training did and copy each 4-bit weight, dequantized, into `base`."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    from moetune.loading import load_model

    quantized, _ = load_model(run.model_section(), run.quantization, router_fp32=run.router_fp32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear4bit):
                weight = module.weight
                base.get_submodule(name).weight.copy_(dequantize_4bit(weight.data, weight.quant_state))
            for attr, parametrizations in getattr(module, "parametrizations", {}).items():
                if any(isinstance(p, Bnb4bitParametrization) for p in parametrizations):  # 4-bit expert weights
                    base.get_parameter(f"{name}.{attr}").copy_(getattr(module, attr))


def sample_rows(run, tokenizer, n: int = SAMPLE_ROWS, max_tokens: int = SAMPLE_TOKENS) -> tuple[list[list[int]], str]:
    """Token ids of the first rows of the run's own data (`data.eval`, else `data.train`), or of a few fixed prompts
    when the data cannot be read from here. Returns (rows, where they came from)."""
    from moetune.config import DataSection
    from moetune.data import load_datasets

    data = run.recipe.data if run.recipe is not None else None
    for source in (data.eval, data.train) if data is not None else ():
        if not source:
            continue
        try:
            split = DataSection(train=source, format=data.format, max_length=data.max_length, assistant_only_loss=False)
            ids = load_datasets(split, tokenizer).train["input_ids"][:n]
        except MoetuneError:
            continue  # moved data or no network: the fixed prompts still catch a broken merge
        return [row[:max_tokens] for row in ids], source
    return [tokenizer(p)["input_ids"][:max_tokens] for p in FALLBACK_PROMPTS[:n]], "fixed prompts"


def _logits(model, rows: list[list[int]]) -> list["torch.Tensor"]:
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row], device=device)).logits[0].float().cpu() for row in rows]


def _compare(reference: list["torch.Tensor"], merged: list["torch.Tensor"], dtype: str, source: str) -> MergeReport:
    import torch

    diffs = [(m - r).abs() for r, m in zip(reference, merged)]
    per_token = torch.cat([d.max(dim=-1).values / r.abs().max(dim=-1).values.clamp_min(1e-12)
                           for d, r in zip(diffs, reference)])
    max_abs = max(float(d.max()) for d in diffs)
    scale = max(float(r.abs().max()) for r in reference)
    return MergeReport(dtype=dtype, max_abs_error=max_abs, max_rel_error=max_abs / max(scale, 1e-12),
                       median_rel_error=float(per_token.median()), tolerance=TOLERANCE[dtype],
                       tokens_above_tolerance=int((per_token > TOLERANCE[dtype]).sum()), rows=len(reference),
                       tokens=per_token.numel(), sample_source=source)


def serving_warning(run_dir: str | Path) -> str | None:
    """What serving engines will not load as it is in this run's adapter, or None when there is nothing to say.

    Expert LoRA (fused 3-D expert weights through PEFT `target_parameters`): vLLM reads PEFT's fused-expert layout
    wrongly or rejects it (vllm-project/vllm#40005, #52198) and SGLang has no expert LoRA (sgl-project/sglang#9897).
    Modules trained in full beside LoRA (`modules_to_save`, e.g. a router): vLLM refuses such adapters
    (vllm-project/vllm#9280). `moetune merge` gives a plain checkpoint that both load.
    """
    from moetune.portable_adapters import adapter_parameter_counts
    from moetune.run_info import read_run_dir

    run = read_run_dir(run_dir)
    if not run.is_adapter:
        return None
    try:
        counts = adapter_parameter_counts(run.path, run.base)
    except MoetuneError:  # base not readable from here: judge by the config alone
        counts = {"experts": {"lora": 1}} if run.adapter_config.get("target_parameters") else {}
    problems = []
    if counts.get("experts", {}).get("lora"):
        problems.append("it has LoRA on the fused expert weights, which vLLM loads wrongly or rejects "
                        "(vllm-project/vllm#40005, #52198) and SGLang does not support (sgl-project/sglang#9897)")
    full = sorted(group for group, entry in counts.items() if entry.get("full"))
    if full:
        problems.append(f"it carries modules trained in full ({', '.join(full)}; PEFT modules_to_save), which vLLM "
                        "refuses (vllm-project/vllm#9280)")
    if not problems:
        return None
    return (f"Serving engines will not load the adapter in {run.path} as it is: {'; '.join(problems)}. "
            f"`moetune merge {run.path} OUT_DIR` writes a plain checkpoint that vLLM and SGLang load.")
