"""Run `finetune` on every rank of a launch and record what the run really was (for tests/test_distributed_fsdp.py).

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/dist_worker.py RECIPE REPORT.json [--resume] [KEY=VALUE ...]

After training, every rank runs the trained (still wrapped, sharded) model on a fixed batch, because an FSDP2
forward needs all ranks; rank 0 writes REPORT.json: distributed type, world size, backend, the wrapper, how each
fused expert weight is held (DTensor, global and local shape), the logged losses and those logits.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    recipe, report = sys.argv[1], Path(sys.argv[2])
    resume = "--resume" in sys.argv[3:]
    overrides = [a for a in sys.argv[3:] if a != "--resume"]
    import torch
    from torch.distributed.tensor import DTensor
    from trainer_capture import record_trainers

    from moetune.training import finetune

    trainers = record_trainers()  # to read the trained model afterwards
    finetune(recipe, overrides=overrides, resume=resume)
    trainer = trainers[0]
    model, state = trainer.model_wrapped, trainer.accelerator.state
    experts = {n: {"type": type(p).__name__, "shape": list(p.shape),
                   "local_shape": list(p.to_local().shape if isinstance(p, DTensor) else p.shape)}
               for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n}
    from moetune.architectures import find_moe_layers

    router_dtypes = []  # what each router's logits come out as (moe.router_fp32 must hold under FSDP2 bf16 too)
    hooks = [layer.router.register_forward_hook(lambda m, i, out: router_dtypes.append(str(out[0].dtype)))
             for layer in find_moe_layers(trainer.model)]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 40).reshape(1, -1)).logits
    for hook in hooks:
        hook.remove()
    if state.is_main_process:
        report.write_text(json.dumps({
            "distributed_type": state.distributed_type.name, "world_size": state.num_processes,
            "backend": state.backend, "wrapper": type(model).__name__, "experts": experts,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "logits": logits.float().tolist(), "router_dtypes": router_dtypes,
        }))


if __name__ == "__main__":
    main()
    # gloo can abort at interpreter exit after the work is done (docs/upstream.md#gloo-exit-abort): leave without
    # running exit-time teardown, as `moetune`'s own entry point does.
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
