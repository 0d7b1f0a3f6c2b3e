"""Step-time overhead of moetune's trainer additions: routing telemetry + router z-loss + expert dropout.

    .venv/bin/python scripts/bench_step_overhead.py                 # Mixtral H256 I512 E8 top-2, 4 layers, 4x256
    .venv/bin/python scripts/bench_step_overhead.py --rounds 60 --impl eager --dtype bfloat16

Copies of the same model train side by side, one step each per round (order reversed every other round):
  baseline   transformers' own path: loss = LM + 0.001 * aux from `output_router_logits=True`.
  all        what MoETrainer adds, together: router hooks (RouterCapture) with aux + z-loss computed from them,
             expert dropout 0.1 and fp32 routers (apply_router_controls), and RoutingTelemetry counting every
             forward and summarizing every 10 steps.
  telemetry / zloss / dropout   one addition at a time (--variants baseline telemetry zloss dropout all).
A step is forward + backward + AdamW step. Printed per variant: median and 10th-percentile step time, and the
overhead vs baseline three ways (medians, p10s, median of the per-round ratios; the last two resist a busy machine).
"""

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from moetune.config import MoESection
from moetune.router_capture import RouterCapture
from moetune.router_controls import apply_router_controls
from moetune.telemetry import RoutingTelemetry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds, one timed step per variant each")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impl", default="grouped_mm", choices=["eager", "grouped_mm"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["baseline", "all"],
                        choices=["baseline", "telemetry", "zloss", "dropout", "all"],
                        help="all = telemetry + z-loss + expert dropout 0.1 + fp32 router")
    parser.add_argument("--hidden-size", type=int, default=256,
                        help="model width; dropout's cost grows with tokens x intermediate, the matmuls' also with this")
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = MixtralConfig(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=1024, max_position_embeddings=args.seq,
        experts_implementation=args.impl,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(ids)
    variants = {name: Variant(name, base if name == "baseline" else copy.deepcopy(base)) for name in args.variants}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for variant in variants.values():
        for _ in range(args.warmup):
            variant.step(ids, mask)
    # One step per variant per round, the order reversed every other round: neighbouring steps share the machine's
    # load, so the per-round ratio to the baseline stays meaningful on a busy machine where absolute times do not.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            sync()
            start = time.perf_counter()
            variants[name].step(ids, mask)
            sync()
            times[name].append(time.perf_counter() - start)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; Mixtral H{args.hidden_size} I{args.intermediate_size} E8 top-2 4 layers, vocab 1024, "
          f"batch {args.batch}x{args.seq}, {args.dtype}, experts {args.impl}; "
          f"{args.rounds} interleaved rounds of one step per variant")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        q = statistics.quantiles(values, n=10)
        line = f"{name:>10}: median {medians[name] * 1000:7.1f} ms/step, p10 {q[0] * 1000:7.1f} ms"
        if "baseline" in times and name != "baseline":
            ratios = [v / b for v, b in zip(values, times["baseline"])]
            line += (f" | overhead: medians {100 * (medians[name] / medians['baseline'] - 1):+5.1f}%, "
                     f"p10s {100 * (q[0] / statistics.quantiles(times['baseline'], n=10)[0] - 1):+5.1f}%, "
                     f"median paired ratio {100 * (statistics.median(ratios) - 1):+5.1f}%")
        print(line + f" (n={len(values)})")


class Variant:
    """One model copy and what it adds to a plain training step."""

    def __init__(self, name: str, model) -> None:
        self.name, self.model = name, model
        parts = {"baseline": (), "telemetry": ("telemetry",), "zloss": ("zloss",), "dropout": ("dropout",),
                 "all": ("telemetry", "zloss", "dropout")}[name]
        self.parts = parts
        self.capture = self.telemetry = None
        if "dropout" in parts:
            apply_router_controls(model, MoESection(expert_dropout=0.1, router_fp32=True))
        if parts and parts != ("dropout",):
            self.capture = RouterCapture(model)
        if "telemetry" in parts:
            self.telemetry = RoutingTelemetry().bind(model, self.capture)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.steps = 0

    def step(self, ids, mask) -> None:
        if self.capture is None:  # transformers' own path: LM + coef * aux from output_router_logits
            loss = self.model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True).loss
        else:  # MoETrainer's path: LM loss, aux (+ z) from the router hooks
            loss = self.model(input_ids=ids, attention_mask=mask, labels=ids).loss
            aux, z = self.capture.losses(8, 2, "softmax")
            self.capture.clear()
            loss = loss + 0.001 * aux + (0.001 * z if "zloss" in self.parts else 0.0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.telemetry is not None and self.steps % 10 == 0:
            self.telemetry.log_metrics(step=self.steps)


if __name__ == "__main__":
    main()
