"""Quality of expert-level fine-tuning and pruning on the tiny pretrained Mixtral (docs/benchmarks.md, issue 11).

    python scripts/pretrain_tiny.py --out runs/pretrained-tiny        # first: the model and the data (a few minutes)
    python scripts/bench_expert_methods.py --base runs/pretrained-tiny --out runs/bench_experts

Fine-tuning on the task (previous weekday/month, counting down), every method with the same data and steps:
full, LoRA (attention + experts), non-experts (ST-MoE), ESFT-Token at top_p 0.1 / 0.2 / 0.3 (full training of the
selected experts). Scores are eval losses on the answers (lower is better): the task's eval set, and the held-aside
"general" eval set of the pretraining mix (forgetting). Pruning: 25% and 50% of the experts with each score (REAP,
tokens, gate; calibrated on general training data), general and task loss after pruning and after a LoRA heal on the
general training data. Writes results.json and prints the markdown tables.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path


FT_STEPS, HEAL_STEPS = 100, 100


def _recipe(model: str, train: str, out: str, *, steps: int, lr: float, **sections) -> dict:
    return {
        "model": {"name_or_path": model, "dtype": "float32", "experts_implementation": "grouped_mm"},
        "moe": {"aux_loss_coef": 0.01, "telemetry": False},
        "data": {"train": train, "max_length": 96},
        "train": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": lr, "weight_decay": 0.01,
                  "lr_scheduler_type": "cosine", "warmup_steps": 10, "logging_steps": 50, "save_strategy": "no",
                  "seed": 0, "disable_tqdm": True, "report_to": "none"},
        "output": {"dir": out},
        **sections,
    }


def _eval_sets(tokenizer, files: dict[str, str]):
    from moetune.config import DataSection
    from moetune.data import load_datasets

    return {name: load_datasets(DataSection(train=files[f"{name}_eval"], max_length=96), tokenizer).train
            for name in ("task", "general")}


def _losses(trainer, eval_sets) -> dict[str, float]:
    return {name: round(trainer.evaluate(eval_dataset=data)["eval_loss"], 4) for name, data in eval_sets.items()}


def _trained_params(trainer) -> int:
    """Parameters that really change: ESFT's unselected expert slices do not."""
    trainable = trainer.freeze_report.trainable
    mask = getattr(trainer, "expert_mask", None)
    if mask is not None:
        trainable -= sum(part.saved.numel() for part in mask.parts)
    return trainable


def run_finetuning(model: str, files: dict[str, str], work: Path) -> list[dict]:
    from moetune.training import build_trainer

    methods = {
        "full": dict(lr=1e-3),
        "LoRA r8 (attention + experts)": dict(lr=4e-3, lora={"r": 8, "alpha": 16, "targets": ["attention", "experts"]}),
        "non-experts": dict(lr=1e-3, freeze={"train": ["non_experts"]}),
        **{f"ESFT-Token p={p}": dict(lr=1e-3, experts={"select": {"score": "tokens", "top_p": p, "max_tokens": 5000}})
           for p in (0.1, 0.2, 0.3)},
    }
    rows = []
    for name, options in methods.items():
        lr = options.pop("lr")
        start = time.time()
        trainer = build_trainer(_recipe(model, files["task_train"], str(work / name.split()[0]), steps=FT_STEPS, lr=lr,
                                        **options))
        eval_sets = _eval_sets(trainer.processing_class, files)
        if not rows:
            rows.append({"method": "pretrained (no fine-tuning)", **_losses(trainer, eval_sets), "trained_params": 0})
        trainer.train()
        row = {"method": name, **_losses(trainer, eval_sets), "trained_params": _trained_params(trainer),
               "seconds": round(time.time() - start, 1)}
        selection = getattr(trainer, "expert_selection", None)
        if selection is not None:
            row["selected_experts"] = {str(k): v for k, v in selection.experts.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_pruning(model: str, files: dict[str, str], work: Path) -> list[dict]:
    from moetune.pruning import prune
    from moetune.training import build_trainer

    rows = []
    for keep in (0.75, 0.5):
        for score in ("reap", "tokens", "gate"):
            start = time.time()
            out = work / f"pruned-{keep}-{score}"
            report = prune(model, files["general_train"], str(out), keep=keep, score=score, max_tokens=5000,
                           max_length=96)
            heal = _recipe(str(out), files["general_train"], str(work / f"heal-{keep}-{score}"), steps=HEAL_STEPS,
                           lr=4e-3, lora={"r": 8, "alpha": 16, "targets": ["attention", "experts"]})
            trainer = build_trainer(heal)
            eval_sets = _eval_sets(trainer.processing_class, files)
            pruned = _losses(trainer, eval_sets)
            trainer.train()
            healed = _losses(trainer, eval_sets)
            row = {"pruned": f"{1 - keep:.0%}", "score": score, "experts": report["num_experts"],
                   "params": report["params"], "active_params": report["active_params"],
                   "calibration_loss": [round(x, 4) for x in report["calibration_loss"]],
                   "general_pruned": pruned["general"], "general_healed": healed["general"],
                   "task_pruned": pruned["task"], "task_healed": healed["task"], "removed": report["removed"],
                   "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["| method | trained params | task loss | general loss |", "|---|---|---|---|"]
    for row in results["finetuning"]:
        lines.append(f"| {row['method']} | {row['trained_params']:,} | {row['task']:.3f} | {row['general']:.3f} |")
    lines += ["", "| pruned | score | params | active | general loss: pruned -> healed | task loss: pruned -> healed |",
              "|---|---|---|---|---|---|"]
    for row in results["pruning"]:
        lines.append(f"| {row['pruned']} | {row['score']} | {row['params'][1]:,} | {row['active_params'][1]:,} | "
                     f"{row['general_pruned']:.3f} -> {row['general_healed']:.3f} | "
                     f"{row['task_pruned']:.3f} -> {row['task_healed']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/pretrained-tiny", help="--out of scripts/pretrain_tiny.py")
    parser.add_argument("--out", default="runs/bench_experts")
    parser.add_argument("--only", choices=["finetuning", "pruning"])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    base = Path(args.base)
    files = {name: str(base / "data" / f"{name}.jsonl")
             for name in ("general_train", "general_eval", "task_train", "task_eval")}
    model = str(base / "model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "finetuning"):
            results["finetuning"] = run_finetuning(model, files, Path(tmp))
            results_file.write_text(json.dumps(results, indent=2))
        if args.only in (None, "pruning"):
            results["pruning"] = run_pruning(model, files, Path(tmp))
            results_file.write_text(json.dumps(results, indent=2))
    if {"finetuning", "pruning"} <= set(results):
        print(markdown(results))


if __name__ == "__main__":
    main()
