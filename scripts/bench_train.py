"""Training-step speed and memory: the stock HF way vs moetune, QLoRA on attention and LoRA on the experts (issue 10).

    .venv/bin/python scripts/bench_train.py                                   # both shapes, every suite, CPU sizes
    .venv/bin/python scripts/bench_train.py --suites step --shapes fine --rounds 10 --batch 8 --seq 256
    .venv/bin/python scripts/bench_train.py --suites footprint --hidden-size 1024 --coarse-width 3584 --layers 8
    python scripts/bench_train.py --hidden-size 4096 --coarse-width 14336 --fine-width 768 --layers 4 \\
        --fine-experts 128 --batch 8 --seq 1024 --dtype bfloat16                  # real widths, on a GPU

Shapes (random weights, every layer MoE, the tiny local BPE tokenizer's vocabulary, rows of --seq tokens):
  coarse  Mixtral-like: 8 experts top-2, expert width --coarse-width (1024).
  fine    Qwen3-MoE-like: --fine-experts (64) experts top-8, expert width --fine-width (128).
Suite `step` (trainer level; each variant takes one batch of the same rows, identical for all, and runs
`Trainer.training_step` + optimizer step + the step-end callbacks, i.e. the whole chain but data loading):
  a stock         TRL SFTTrainer + PEFT LoRA r16 on q/k/v/o + transformers' BitsAndBytesConfig 4-bit (nf4, double
                  quant), transformers' default experts implementation; the fused experts stay full precision.
  b moetune       `build_trainer` on the same recipe: experts 4-bit too (dequantized per routed expert, again in
                  backward); moe.aux_loss and moe.telemetry off, like (a).
  b0 dequant-all  (b) with the family's own experts forward: every expert dequantized every forward and kept for
                  backward (moetune before issue 10 item 3).
  c moetune+moe   (b) with aux loss, z-loss 1e-3, expert dropout 0.1 and routing telemetry on.
  e moetune fp    (b) on a full-precision base (no quantization section).
Suite `lora` (model level, as before: forward + backward + AdamW on `load_model` + `add_adapters`): LoRA r8 on every
expert's gate_up_proj/down_proj, PEFT's fold (`experts_path: peft`) vs moetune's split, fp32 and 4-bit base (d).
Suite `footprint`: moetune QLoRA on attention, coarse shape, batch 1 x (2 x --seq) tokens with activation
checkpointing: peak memory of a step over the model's 4-bit footprint.
Speed: every variant of a suite and shape lives in this process; one step each per round, the order reversed every
other round; median step time and tokens/s; ratios are medians of per-round ratios (robust to a shared machine). Memory: each variant again in its own process (glibc's mmap threshold
fixed at 64 KiB so freed tensors leave RSS): `peak` = peak anonymous RSS during a step (sampled every 2 ms; on a GPU
the allocator's peak), `step+` = that peak above the memory before the step, `model` and `experts` = resident bytes
of the weights (quantization state included); `lora` suite also `bwd+` = the backward's peak above the memory
after the forward (the issue's "extra backward memory"); `footprint`: `train peak` = peak above the process before
the model was loaded (libraries imported, `_LIBRARIES`). Ends with one JSON line.
"""

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


SUITES = {
    "step": ["a_stock", "b_moetune", "b0_dequant_all", "c_moetune_moe", "e_moetune_fp"],
    "lora": ["d_peft_fp", "d_split_fp", "d_peft_4bit", "d_split_4bit"],
    "footprint": ["f_moetune_ckpt"],
}
MB = 1 / 2**20


def shape_config(shape: str, args):
    import transformers

    from moetune.tiny import build_tokenizer

    vocab = len(build_tokenizer())
    common = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=args.seq * max(1, args.footprint_rows),
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=5)
    if shape == "coarse":
        return transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2,
                                          intermediate_size=args.coarse_width, **common)
    return transformers.Qwen3MoeConfig(num_experts=args.fine_experts, num_experts_per_tok=8,
                                       moe_intermediate_size=args.fine_width, intermediate_size=4 * args.fine_width,
                                       head_dim=args.hidden_size // 8, norm_topk_prob=True, **common)


def make_model_dir(shape: str, root: Path, args) -> Path:
    import transformers

    from moetune.tiny import build_tokenizer

    path = root / shape
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(shape_config(shape, args), dtype=getattr(torch, args.dtype))
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def make_data(root: Path, seq: int, rows: int = 64) -> Path:
    """Plain-text rows of just under `seq` tokens each, so no row is dropped or truncated."""
    from moetune.tiny import _CORPUS, build_tokenizer

    tokenizer, words = build_tokenizer(), _CORPUS.split()
    rng, out = random.Random(0), []
    for _ in range(rows):
        text = ""
        while len(tokenizer(text + " x" * 8)["input_ids"]) < seq - 4:
            text += " " + " ".join(rng.choice(words) for _ in range(8))
        out.append(json.dumps({"text": text.strip()}))
    path = root / "train.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Variants: each gives a `step()` callable and the model it trains


def _train_args(args, batch: int, checkpointing: bool) -> dict:
    return dict(per_device_train_batch_size=batch, max_steps=10_000, learning_rate=1e-5, save_strategy="no",
                logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=checkpointing, report_to="none",
                seed=0, bf16=args.dtype == "bfloat16")


def moetune_trainer(path: Path, data: Path, out: Path, args, *, quantized=True, moe=False, batch=None,
                    checkpointing=False):
    from moetune.training import build_trainer

    recipe = {
        "model": {"name_or_path": str(path), "dtype": args.dtype},
        "lora": {"r": 16, "alpha": 32, "targets": ["attention"]},
        "moe": ({"aux_loss": True, "z_loss_coef": 1e-3, "expert_dropout": 0.1, "telemetry": True} if moe
                else {"aux_loss": False, "telemetry": False}),
        "data": {"train": str(data), "max_length": args.seq},
        "train": _train_args(args, batch or args.batch, checkpointing),
        "output": {"dir": str(out)},
    }
    if quantized:
        recipe["quantization"] = {}
    return build_trainer(recipe)


def stock_trainer(path: Path, data: Path, out: Path, args):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = getattr(torch, args.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant,
                                                 device_map="cuda" if torch.cuda.is_available() else None)
    sft = SFTConfig(output_dir=str(out), max_length=args.seq, use_cpu=not torch.cuda.is_available(),
                    **_train_args(args, args.batch, False))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=sft, train_dataset=load_dataset("json", data_files=str(data), split="train"),
                      processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora)


class TrainerStep:
    """One optimizer step through the trainer's own `training_step` (forward, MoE losses, backward) and callbacks."""

    def __init__(self, trainer, batch: dict):
        self.trainer, self.batch = trainer, batch
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # what `Trainer.train` sets before its first step
        if trainer.args.activation_checkpointing:  # `Trainer.train` turns it on, not the constructor
            kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
            trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        trainer.model.train()
        self.model = trainer.model

    def __call__(self) -> None:
        t = self.trainer
        t.training_step(t.model, dict(self.batch))
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.state.global_step += 1
        t.callback_handler.on_step_end(t.args, t.state, t.control)


class ModelStep:
    """Forward + backward + AdamW on a model (the `lora` suite)."""

    def __init__(self, model, ids):
        self.model, self.ids = model.train(), ids
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def __call__(self) -> None:
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def lora_model(path: Path, experts_path: str, quantized: bool, args):
    from moetune.adapters import add_adapters
    from moetune.config import LoraSection, ModelSection, QuantizationSection
    from moetune.loading import load_model

    section = ModelSection(name_or_path=str(path), dtype=args.dtype, experts_implementation="grouped_mm")
    model, _ = load_model(section, QuantizationSection() if quantized else None, with_tokenizer=False)
    model = add_adapters(model, LoraSection(r=8, alpha=16, targets=["experts"], experts_path=experts_path))
    with torch.no_grad():  # B starts at 0 in PEFT; make the LoRA path do real work
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.01)
    return model.to(args.device)


def fixed_batch(shape: str, data: Path, out: Path, args) -> dict:
    """One collated batch of the training rows (moetune's data pipeline), the same tensors for every variant.

    Built through a one-layer, narrow model of the same family and tokenizer: the batch depends on the tokenizer,
    the data and the recipe only, and loading the benchmarked model a second time in full precision would double
    the script's peak memory (at 2.9B parameters it reached 21 GB).
    """
    small = argparse.Namespace(**{**vars(args), "hidden_size": 64, "layers": 1, "coarse_width": 64, "fine_width": 32,
                                  "fine_experts": 8, "dtype": "float32"})
    path = make_model_dir(shape, out / "batch-model", small)
    trainer = moetune_trainer(path, data, out, args, quantized=False)
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.cpu() for k, v in batch.items()}


def build(variant: str, path: Path, data: Path, out: Path, args, batch: dict):
    """`(step, model)` of a variant."""
    from moetune.quantized_experts import remove_quantized_forward

    out = out / variant
    if variant == "a_stock":
        trainer = stock_trainer(path, data, out, args)
    elif variant.startswith(("b", "c", "e")):
        trainer = moetune_trainer(path, data, out, args, quantized=variant != "e_moetune_fp", moe=variant[0] == "c")
        if variant == "b0_dequant_all":
            remove_quantized_forward(trainer.model)
    elif variant == "f_moetune_ckpt":
        trainer = moetune_trainer(path, data, out, args, batch=1, checkpointing=True)
        batch = footprint_batch(batch, args)
    else:
        _, experts_path, quant = variant.split("_")
        ids = batch["input_ids"].to(args.device)
        step = ModelStep(lora_model(path, experts_path, quant == "4bit", args), ids)
        return step, step.model
    step = TrainerStep(trainer, batch)
    return step, step.model


def footprint_batch(batch: dict, args) -> dict:
    """Batch 1 x --footprint-rows rows back to back (one sequence of footprint_rows x --seq tokens)."""
    return {k: v[:args.footprint_rows].reshape(1, -1) for k, v in batch.items()}


def tokens(variant: str, batch: dict, args) -> int:
    if variant == "f_moetune_ckpt":
        return int(footprint_batch(batch, args)["input_ids"].numel())
    return int(batch["input_ids"].numel())


# ---------------------------------------------------------------------------------------------------------
# Memory (one variant per process)


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


class _AnonPeak(threading.Thread):
    """Samples RssAnon every 2 ms (the kernel keeps a high-water mark for total RSS only)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _status()["RssAnon"], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _status()["RssAnon"])


@contextlib.contextmanager
def measured():
    """Yields a dict that gets `peak_mb` (anonymous RSS / CUDA allocator peak) and `step_plus_mb` (above the start)."""
    result: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        sampler = _AnonPeak()
        before = sampler.peak  # nested use: the inner sampler sees the same process, so peaks compose
        sampler.start()
        yield result
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak, _status()["RssAnon"])
    result.update(peak_mb=peak * MB, step_plus_mb=(peak - before) * MB)


# Imported before the baseline: library code is not training memory. The chain imports these lazily while it builds
# (measured: ~87 MB of anonymous memory, datasets 47 MB, matplotlib 21 MB, deepspeed 13 MB when installed).
_LIBRARIES = ("peft", "trl", "trl.trainer.sft_trainer", "transformers.trainer", "datasets", "accelerate", "bitsandbytes",
              "matplotlib.pyplot", "deepspeed", "moetune.training", "moetune.loading", "moetune.trainer", "moetune.data")


def worker(variant: str, path: Path, data: Path, out: Path, args) -> dict:
    import importlib

    for name in _LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one (deepspeed) that is not installed
            pass
    from moetune.quantization import usage_by_group

    batch = torch.load(out / "batch.pt")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _status()["RssAnon"] if not torch.cuda.is_available() else 0
    step, model = build(variant, path, data, out, args, batch)
    step()  # warm-up: optimizer state, kernels
    if isinstance(step, ModelStep):  # forward and backward apart: the backward's own extra memory (issue 10)
        with measured() as memory:
            loss = model(input_ids=step.ids, labels=step.ids).loss
            with measured() as backward:
                loss.backward()
            step.optimizer.step()
            step.optimizer.zero_grad(set_to_none=True)
        memory["bwd_plus_mb"] = backward["step_plus_mb"]
    else:
        with measured() as memory:
            step()
    groups = usage_by_group(model)
    memory.update(model_mb=sum(g["resident_bytes"] for g in groups.values()) * MB,
                  experts_mb=groups.get("experts", {}).get("resident_bytes", 0) * MB,
                  # CPU: everything the process holds for training above what it held before the model existed
                  train_peak_mb=(memory["peak_mb"] - start * MB) if not torch.cuda.is_available() else memory["peak_mb"])
    return memory


# ---------------------------------------------------------------------------------------------------------


def run_suite(suite: str, shape: str, path: Path, data: Path, root: Path, args) -> list[dict]:
    batch = torch.load(root / "batch.pt")
    variants = SUITES[suite]
    steps = {v: build(v, path, data, root, args, batch)[0] for v in variants}
    for v in variants:
        for _ in range(args.warmup):
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[v]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - start)
    del steps
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    rows = []
    for v in variants:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", v, str(path), str(data), str(root)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory worker {v} failed:\n{proc.stderr[-3000:]}")
        memory = json.loads(proc.stdout.strip().splitlines()[-1])
        median = statistics.median(times[v])
        rows.append({"suite": suite, "shape": shape, "variant": v, "median_ms": median * 1000,
                     "p10_ms": sorted(times[v])[len(times[v]) // 10] * 1000,
                     "tokens_per_s": tokens(v, batch, args) / median, **memory,
                     "times_ms": [t * 1000 for t in times[v]]})
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    def get(shape, variant):
        return next((r for r in rows if r["shape"] == shape and r["variant"] == variant), None)

    out = {}
    for shape in ("coarse", "fine"):
        pairs = {"b/a speed": ("b_moetune", "a_stock", "speed"), "b0/a speed": ("b0_dequant_all", "a_stock", "speed"),
                 "b/b0 speed": ("b_moetune", "b0_dequant_all", "speed"),
                 "a/b experts memory": ("a_stock", "b_moetune", "experts_mb"),
                 "c/b time": ("c_moetune_moe", "b_moetune", "time"), "b/e speed": ("b_moetune", "e_moetune_fp", "speed"),
                 "b/a step peak": ("b_moetune", "a_stock", "step_plus_mb"),
                 "split/peft speed fp32": ("d_split_fp", "d_peft_fp", "speed"),
                 "split/peft speed 4bit": ("d_split_4bit", "d_peft_4bit", "speed"),
                 "split/peft step+ fp32": ("d_split_fp", "d_peft_fp", "step_plus_mb"),
                 "split/peft step+ 4bit": ("d_split_4bit", "d_peft_4bit", "step_plus_mb"),
                 "split/peft bwd+ fp32": ("d_split_fp", "d_peft_fp", "bwd_plus_mb"),
                 "split/peft bwd+ 4bit": ("d_split_4bit", "d_peft_4bit", "bwd_plus_mb")}
        for name, (x, y, what) in pairs.items():
            rx, ry = get(shape, x), get(shape, y)
            if rx and ry:
                # Times: the median of per-round ratios (the two steps of a round ran next to each other, so they
                # saw about the same load from whatever else shares the machine).
                paired = [tx / ty for tx, ty in zip(rx["times_ms"], ry["times_ms"])]
                if what == "speed":
                    value = 1 / statistics.median(paired)
                elif what == "time":
                    value = statistics.median(paired)
                else:
                    value = rx[what] / max(ry[what], 1e-9)
                out[f"{shape} {name}"] = round(value, 3)
    footprint = get("coarse", "f_moetune_ckpt")
    if footprint:
        out["coarse footprint peak / 4-bit model"] = round(footprint["train_peak_mb"] / footprint["model_mb"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=["step", "lora", "footprint"], choices=list(SUITES))
    parser.add_argument("--shapes", nargs="+", default=["coarse", "fine"], choices=["coarse", "fine"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--footprint-rows", type=int, default=2, help="rows (of --seq tokens) in the footprint batch")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--coarse-width", type=int, default=1024)
    parser.add_argument("--fine-width", type=int, default=128)
    parser.add_argument("--fine-experts", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "MODEL_DIR", "DATA", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    if args.worker:
        variant, path, data, root = args.worker
        print(json.dumps(worker(variant, Path(path), Path(data), Path(root), args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args.seq)
        for shape in args.shapes:
            path = make_model_dir(shape, tmp, args)
            root = tmp / f"{shape}-runs"
            root.mkdir()
            torch.save(fixed_batch(shape, data, root / "batch", args), root / "batch.pt")
            for suite in args.suites:
                if suite == "footprint" and shape != "coarse":
                    continue
                rows = run_suite(suite, shape, path, data, root, args)
                print("partial:", json.dumps(rows), flush=True)  # a long run on a busy machine still leaves numbers
                results += rows
    print(f"{platform.processor() or 'cpu'} / {args.device}, {args.threads} threads; torch {torch.__version__}; "
          f"{args.dtype}; batch {args.batch}x{args.seq}; {args.rounds} interleaved rounds; load {os.getloadavg()}")
    print(f"{'shape':>6} {'variant':>15} {'ms/step':>8} {'p10 ms':>8} {'tok/s':>7} {'peak MB':>8} {'step+ MB':>9} {'bwd+ MB':>8} "
          f"{'model MB':>9} {'experts MB':>10} {'train peak MB':>13}")
    for r in results:
        bwd = f"{r['bwd_plus_mb']:8.1f}" if "bwd_plus_mb" in r else f"{'':>8}"
        print(f"{r['shape']:>6} {r['variant']:>15} {r['median_ms']:8.1f} {r['p10_ms']:8.1f} {r['tokens_per_s']:7.0f} {r['peak_mb']:8.1f} "
              f"{r['step_plus_mb']:9.1f} {bwd} {r['model_mb']:9.1f} {r['experts_mb']:10.1f} {r['train_peak_mb']:13.1f}")
    summary = ratios(results)
    for name, value in summary.items():
        print(f"{name:>40}: {value:.3f}")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results,
                      "ratios": summary}))


if __name__ == "__main__":
    main()
