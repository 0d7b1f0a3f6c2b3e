"""Memory benchmark for 4-bit loading of a Mixtral-shaped MoE: stock transformers+bitsandbytes vs moetune.

    python scripts/bench_memory.py --out runs/bench_memory          # build (once) and measure, ~10 min on 2 cores
    python scripts/bench_memory.py --out runs/bench_memory --json   # the same, results as JSON
    python scripts/bench_memory.py --out runs/bench_mixtral_prop --shape mixtral-proportions   # Mixtral-8x7B's group shares

Builds a random Mixtral-shaped model of about 1.2B parameters, saved as sharded safetensors in the legacy
per-expert layout real Mixtral checkpoints use (so transformers fuses the experts at load time). Then, each in
its own process, loads it:
  * bf16   : plain bf16 (the reference for the error measurement),
  * stock  : `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant))`,
  * moetune: `moetune.loading.load_model(..., QuantizationSection())`,
and reports for each: resident bytes per parameter (tensors incl. quantization state, measured on the loaded
model), the peak RSS during the load above the process's baseline (VmHWM reset after imports; also the peak of
anonymous memory only, sampled, since mmapped checkpoint pages count in RSS but are reclaimable), and the
relative L2 error of one MoE layer's output on fixed random inputs against an fp32 computation from the bf16
weights. For comparison it also reports the error of the same layer computed with one bitsandbytes `Linear4bit`
per expert matrix (nf4, double quant) on the same weights.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


# Mixtral-shaped (8 experts, top-2, GQA 8:2, SwiGLU), scaled to ~1.2B parameters: ~91% of them in the experts.
CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=8,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
              max_position_embeddings=4096, tie_word_embeddings=False)
# The same width, with Mixtral-8x7B's group shares: experts 96.6%, attention 2.9% (I/H = 3.5 as in Mixtral), and
# embeddings + head 0.5% (Mixtral's 32000 x 4096 scaled to this width). A whole-model bytes/param is only comparable
# to Mixtral's when the unquantized embeddings weigh what they weigh there.
MIXTRAL_PROPORTIONS = {**CONFIG, "intermediate_size": 3584, "vocab_size": 3200}
SHAPES = {"scaled": CONFIG, "mixtral-proportions": MIXTRAL_PROPORTIONS}
LAYER = 3  # the MoE layer whose output error is measured
TOKENS = 512


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class _AnonPeak(threading.Thread):
    """Samples RssAnon every 10 ms (the kernel keeps a high-water mark for total RSS only)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(0.01)


def build(model_dir: Path, shape: dict) -> None:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from moetune.tiny import build_tokenizer

    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    config = MixtralConfig(**shape)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: no 4.8 GB fp32 copy
    model = MixtralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir, max_shard_size="500MB")  # legacy per-expert keys, 5 shards
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)  # fails early if the directory is unusable


def _block_input(path: Path):
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, CONFIG["hidden_size"], generator=gen)
    torch.save(x, path)


def _moe_output(block, x):
    import torch

    with torch.no_grad():
        out = block(x.to(torch.bfloat16)[None])  # every variant's activations are bf16
    out = out[0] if isinstance(out, tuple) else out
    return out.float().reshape(TOKENS, -1)


def _linear4bit_moe(block, x):
    """The MoE layer computed with one bitsandbytes Linear4bit per expert matrix (what stock bnb would do)."""
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F

    experts = block.experts
    hidden = CONFIG["hidden_size"]

    def linear4bit(weight):
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
        return layer.train()  # train mode: no CPU repack (see moetune/_compat.py)

    with torch.no_grad():
        h = x.to(torch.bfloat16)
        _, scores, indices = block.gate(h)
        out = torch.zeros(TOKENS, hidden)
        for e in range(experts.gate_up_proj.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            gate_up = linear4bit(experts.gate_up_proj[e])(h[token])
            gate, up = gate_up.chunk(2, dim=-1)
            y = linear4bit(experts.down_proj[e])(F.silu(gate) * up)
            out.index_add_(0, token, y.float() * scores[token, slot, None].float())
    return out


def measure(variant: str, model_dir: Path, work: Path) -> dict:
    import torch

    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moetune.config import ModelSection, QuantizationSection
    from moetune.loading import load_model
    from moetune.quantization import usage_by_group

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak is measured from here on
    baseline = _status()
    sampler = _AnonPeak()
    sampler.start()
    start = time.time()
    if variant == "moetune":
        model, _ = load_model(ModelSection(name_or_path=str(model_dir)), QuantizationSection())
    elif variant == "stock":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=config,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    load_s = time.time() - start
    sampler.stop.set()
    sampler.join()
    after = _status()
    groups = usage_by_group(model)
    resident = sum(g["resident_bytes"] for g in groups.values())
    params = sum(g["params"] for g in groups.values())

    x = torch.load(work / "block_input.pt")
    block = model.model.layers[LAYER].mlp
    torch.save(_moe_output(block, x), work / f"out_{variant}.pt")
    result = {
        "variant": variant, "load_s": round(load_s, 1), "params": params, "resident_bytes": resident,
        "bytes_per_param": resident / params,
        "experts_bytes_per_param": groups["experts"]["resident_bytes"] / groups["experts"]["params"],
        "peak_rss_above_baseline": after["VmHWM"] - baseline["VmRSS"],
        "peak_anon_above_baseline": sampler.peak - baseline["RssAnon"],
        "final_rss_above_baseline": after["VmRSS"] - baseline["VmRSS"],
        "final_anon_above_baseline": after["RssAnon"] - baseline["RssAnon"],
        "groups": groups,
    }
    if variant == "bf16":
        # Ground truth: the same layer in fp32 from the bf16 weights; plus bitsandbytes Linear4bit on them.
        torch.save(_linear4bit_moe(block, x), work / "out_linear4bit.pt")
        block.float()
        with torch.no_grad():
            ref = block(x[None])
        torch.save((ref[0] if isinstance(ref, tuple) else ref).float().reshape(TOKENS, -1), work / "out_fp32.pt")
    return result


def _rel_err(work: Path, name: str) -> float:
    import torch

    ref = torch.load(work / "out_fp32.pt")
    return float((torch.load(work / f"out_{name}.pt") - ref).norm() / ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="scaled",
                        help="scaled: Mixtral's vocab at width 1024 (embeddings 5.4%%); mixtral-proportions: Mixtral-8x7B's group shares")
    parser.add_argument("--variant", choices=["bf16", "stock", "moetune"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir, work = args.out / "model", args.out
    if args.variant:  # child process: one load, one JSON line
        print(json.dumps(measure(args.variant, model_dir, work)))
        return

    work.mkdir(parents=True, exist_ok=True)
    build(model_dir, SHAPES[args.shape])
    _block_input(work / "block_input.pt")
    results = {}
    for variant in ("bf16", "stock", "moetune"):
        proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--variant", variant],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    for variant in ("bf16", "stock", "moetune", "linear4bit"):
        results.setdefault(variant, {"variant": variant})["moe_layer_rel_err"] = _rel_err(work, variant)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    gb = 1e9
    print(f"model: Mixtral-shaped, {results['bf16']['params'] / 1e9:.3f}B params, {SHAPES[args.shape]}")
    print(f"{'variant':10} {'load s':>7} {'B/param':>8} {'experts B/p':>11} {'resident GB':>11} "
          f"{'peak RSS+':>9} {'peak anon+':>10} {'final RSS+':>10} {'MoE rel err':>11}")
    for name in ("bf16", "stock", "moetune"):
        r = results[name]
        print(f"{name:10} {r['load_s']:7.1f} {r['bytes_per_param']:8.3f} {r['experts_bytes_per_param']:11.3f} "
              f"{r['resident_bytes'] / gb:11.3f} {r['peak_rss_above_baseline'] / gb:9.2f} "
              f"{r['peak_anon_above_baseline'] / gb:10.2f} {r['final_rss_above_baseline'] / gb:10.2f} "
              f"{r['moe_layer_rel_err']:11.4f}")
    print(f"{'linear4bit':10} {'':>7} {'':>8} {'':>11} {'':>11} {'':>9} {'':>10} {'':>10} "
          f"{results['linear4bit']['moe_layer_rel_err']:11.4f}   (bitsandbytes Linear4bit per expert matrix)")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
