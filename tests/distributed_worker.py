"""One rank of a 2-process run for tests/test_distributed_deepspeed.py and tests/test_expert_parallel.py.

    torchrun --nproc_per_node 2 tests/distributed_worker.py RECIPE REPORT_DIR [--starve-rank1]

Per rank, in one launch (process start and imports dominate the time, so every check shares it):
1. `finetune(RECIPE)`: 4 steps, checkpoints at 2 and 4, into output.dir + "/a".
2. A copy of that run with checkpoint-4 and the finished state removed is `--resume`d to step 4 ("/b"),
   as if the first run had stopped after checkpoint-2.
3. The trained model's logits on a fixed input (run by the engine, on every rank) go to REPORT_DIR/logits<R>.pt.
4. REPORT_DIR/rank<R>.json: distributed type, ZeRO stage, world size, how parameters and experts are held,
   both runs' per-step losses.

--starve-rank1: rank 1's routers never pick experts 2 and 3 (their logits are pushed to -1e4 before top-k), so
under ZeRO-3 one rank's batch leaves experts without tokens while the other's uses them (DeepSpeed #4808).
"""

import json
import os
import shutil
import sys
from pathlib import Path


STARVED = (2, 3)
FIXED_TEXT = ["The router sends tokens to experts.", "What is 7 times 8? 56. Hello, world!"]


def starve(model, experts=STARVED):
    """Forward hooks on every router: the starved experts never reach the top-k (Mixtral's routing recomputed)."""
    import torch

    from moetune.architectures import find_moe_layers

    def hook(module, args, output):
        logits = output[0].clone()
        logits[..., list(experts)] = -1e4
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, output[2].shape[-1], dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(output[1].dtype), index

    return [layer.router.register_forward_hook(hook) for layer in find_moe_layers(model)]


def fixed_batch(tokenizer):
    return tokenizer(FIXED_TEXT, return_tensors="pt", padding=True)


def main() -> None:
    recipe_path, report_dir = sys.argv[1], Path(sys.argv[2])
    starve_rank1 = "--starve-rank1" in sys.argv[3:]
    rank = int(os.environ["RANK"])
    import torch
    import torch.distributed as dist
    from trainer_capture import record_trainers

    from moetune.config import load_recipe
    from moetune.training import finetune

    recipe = load_recipe(recipe_path)
    out = Path(recipe.output.dir)
    # A handle on each trainer, and the starving hooks before training starts.
    trainers = record_trainers(lambda trainer: starve(trainer.model) if starve_rank1 and rank == 1 else None)
    finetune(recipe_path, overrides=[f"output.dir={out / 'a'}"])
    trainer = trainers[-1]
    info = _describe(trainer)

    # Logits of the trained model, run the way training ran it (ZeRO-3 gathers inside the engine's hooks).
    batch = fixed_batch(trainer.processing_class)
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    report_dir.mkdir(parents=True, exist_ok=True)
    torch.save(logits.float().cpu(), report_dir / f"logits{rank}.pt")

    if rank == 0:  # run "b" = run "a" stopped right after checkpoint-2
        shutil.copytree(out / "a", out / "b", ignore=shutil.ignore_patterns("checkpoint-4", "*.lock", ".lock*"))
        (out / "b" / "metrics.json").unlink()
    dist.barrier()
    finetune(recipe_path, overrides=[f"output.dir={out / 'b'}"], resume=True)

    def losses(run):
        history = json.loads((out / run / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    info.update(losses_a=losses("a"), losses_b=losses("b"))
    (report_dir / f"rank{rank}.json").write_text(json.dumps(info, indent=1))
    dist.barrier()
    # gloo can abort at interpreter exit after the work is done; leave without running exit-time teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _describe(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    from moetune.architectures import find_moe_layers
    from moetune.deepspeed_setup import describe_sharding as ds_sharding
    from moetune.expert_parallel import describe_sharding as ep_sharding

    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.named_parameters())
    experts = [p for layer in find_moe_layers(model) for p in layer.experts.parameters() if p.dim() == 3
               or len(getattr(p, "ds_shape", ())) == 3]
    return {
        "distributed_type": state.distributed_type.name, "world_size": trainer.args.world_size,
        "num_processes": state.num_processes, "backend": state.backend,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "engine": type(trainer.model_wrapped).__name__,
        "params": len(params), "ds_params": sum(hasattr(p, "ds_id") for _, p in params),
        "ds_local_numel": sum(p.ds_tensor.numel() for _, p in params if hasattr(p, "ds_tensor")),
        "ds_full_numel": sum(p.ds_numel for _, p in params if hasattr(p, "ds_numel")),
        "z3_leaves": sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)}),
        "expert_params": len(experts),
        "expert_dtensor": sum(isinstance(p, DTensor) for p in experts),
        "expert_local_rows": sorted({p.to_local().shape[0] for p in experts if isinstance(p, DTensor)}),
        "expert_full_rows": sorted({p.shape[0] for p in experts if isinstance(p, DTensor)}),
        "sharding": ds_sharding(model) or ep_sharding(model),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for _, p in params if p.requires_grad}),
    }


if __name__ == "__main__":
    main()
