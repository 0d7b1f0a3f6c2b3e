"""Expert-LoRA training step: PEFT's fold (W + scale*B@A per forward) vs moetune's split path (LoRA on the tokens).

    .venv/bin/python scripts/bench_train.py                              # both shapes, fp32, plain and 4-bit base
    .venv/bin/python scripts/bench_train.py --shapes fine --rounds 20 --batch 4 --seq 256

Shapes (random weights, 2 layers, vocab 1024, every layer MoE, LoRA r=8 on every expert's gate_up_proj/down_proj):
  coarse  Mixtral-like: H512, 8 experts top-2, expert width 1024.
  fine    Qwen3-MoE-like: H512, 64 experts top-8, expert width 128.
Speed: all variants of a shape live in this process and train one step each per round, the order reversed every
other round (a step = forward + backward + AdamW; median and tokens/s). Memory: each variant runs once more in its
own process (glibc's mmap threshold fixed at 64 KiB, so freed tensors leave RSS and VmHWM tracks live tensors):
  saved     bytes autograd keeps for backward during the forward (unique storages other than the model's own
            parameters, via saved_tensors_hooks): activations, and PEFT's folded or a 4-bit base's dequantized weights;
  bwd+      the backward's peak RSS above the RSS after the forward: what backward needs on top (the issue's
            "extra backward memory");
  step+     the step's peak RSS above the RSS before the forward.
Ends with one JSON line.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


SHAPES = {
    "coarse": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=1024)),
    "fine": ("Qwen3MoeConfig", dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=128,
                                     intermediate_size=1024, head_dim=64, norm_topk_prob=True)),
}
VARIANTS = [(path, quant) for quant in ("none", "4bit") for path in ("peft", "split")]


def make_model_dir(shape: str, root: Path) -> Path:
    import transformers

    class_name, extra = SHAPES[shape]
    config = getattr(transformers, class_name)(
        hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
        max_position_embeddings=2048, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    path = root / shape
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def load_variant(path: Path, experts_path: str, quant: str):
    from moetune.adapters import add_adapters
    from moetune.config import LoraSection, ModelSection, QuantizationSection
    from moetune.loading import load_model

    section = ModelSection(name_or_path=str(path), dtype="float32", experts_implementation="grouped_mm")
    model, _ = load_model(section, QuantizationSection() if quant == "4bit" else None, with_tokenizer=False)
    model = add_adapters(model, LoraSection(r=8, alpha=16, targets=["experts"], experts_path=experts_path))
    with torch.no_grad():  # B starts at 0 in PEFT; make the LoRA path do real work
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.01)
    return model.train()


def step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status()["VmRSS"]


def worker(path: Path, experts_path: str, quant: str, ids) -> dict[str, float]:
    model = load_variant(path, experts_path, quant)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step(model, optimizer, ids)  # warm-up: AdamW state, kernels
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saving a weight costs nothing extra

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    before = _reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    fwd = _status()
    after_fwd = _reset_peak()
    loss.backward()
    bwd = _status()
    mb = 1 / 2**20
    return {"saved_mb": sum(saved.values()) * mb, "bwd_extra_mb": (bwd["VmHWM"] - after_fwd) * mb,
            "step_peak_mb": (max(fwd["VmHWM"], bwd["VmHWM"]) - before) * mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "PATH", "QUANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], args.worker[2], ids)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            path = make_model_dir(shape, Path(tmp))
            models = {v: load_variant(path, *v) for v in VARIANTS}
            optimizers = {v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                          for v, m in models.items()}
            for v in VARIANTS:
                for _ in range(args.warmup):
                    step(models[v], optimizers[v], ids)
            times: dict[tuple, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    start = time.perf_counter()
                    step(models[v], optimizers[v], ids)
                    times[v].append(time.perf_counter() - start)
            del models, optimizers
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            for v in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", str(path), *v, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--threads", str(args.threads)]
                memory = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                                    .stdout.strip().splitlines()[-1])
                median = statistics.median(times[v])
                results.append({"shape": shape, "experts_path": v[0], "base": v[1], "median_ms": median * 1000,
                                "tokens_per_s": args.batch * args.seq / median, **memory})
    print(f"{platform.processor() or 'cpu'}, {args.threads} threads; torch {torch.__version__}; fp32; batch "
          f"{args.batch}x{args.seq}; {args.rounds} interleaved rounds; LoRA r=8 on all experts")
    print(f"{'shape':>7} {'base':>5} {'path':>6} {'ms/step':>8} {'tok/s':>7} {'saved MB':>9} {'bwd+ MB':>8} "
          f"{'step+ MB':>9} {'speed x':>8} {'bwd+ x':>7}")
    for row in results:
        ref = next(r for r in results if r["shape"] == row["shape"] and r["base"] == row["base"]
                   and r["experts_path"] == "peft")
        row["speed_vs_peft"] = ref["median_ms"] / row["median_ms"]
        row["bwd_extra_vs_peft"] = row["bwd_extra_mb"] / max(ref["bwd_extra_mb"], 1e-9)
        print(f"{row['shape']:>7} {row['base']:>5} {row['experts_path']:>6} {row['median_ms']:8.1f} "
              f"{row['tokens_per_s']:7.0f} {row['saved_mb']:9.1f} {row['bwd_extra_mb']:8.1f} {row['step_peak_mb']:9.1f} "
              f"{row['speed_vs_peft']:8.2f} {row['bwd_extra_vs_peft']:7.2f}")
    print(json.dumps({"batch": args.batch, "seq": args.seq, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
