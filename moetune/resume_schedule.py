"""The learning rate a resumed run trains at: the resumed recipe's schedule, from the step it resumes at.

transformers (5.23) restores three things on resume: the optimizer's learning rates (the value the old schedule
had reached), the scheduler's step count and its base rates, while the schedule's shape (a `LambdaLR` over
`max_steps` and the warmup) is rebuilt from the recipe being resumed. When `--resume` asks for more steps or epochs
(moetune's way to train a finished run longer), the first resumed step trains at the checkpoint's rate (0 at the end
of a linear or cosine decay) and every later step jumps to the new schedule; a changed `learning_rate` is ignored
(the base rates come from the checkpoint). Both silently. So after loading, every parameter group is set to the
recipe's schedule at the resumed step, with the recipe's learning rate as base; when the plan is unchanged this is
exactly the checkpoint's value, and nothing changes (docs/upstream.md#resume-schedule).
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR


def follow_recipe_schedule(optimizer, scheduler, learning_rate: float) -> tuple[float, float] | None:
    """Set each parameter group's rate (and the scheduler's base and last rates) to the recipe's schedule at the
    scheduler's current step. Returns `(checkpoint's rate, new rate)` of the first group when anything changed.

    Only `LambdaLR` schedules (every `lr_scheduler_type` transformers builds but `reduce_lr_on_plateau`) are
    followed. The base rate becomes `learning_rate` when all groups shared one base (Trainer's own optimizer);
    groups with different bases (a custom optimizer) keep theirs.
    """
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    if not isinstance(scheduler, LambdaLR):
        return None
    bases = list(scheduler.base_lrs)
    if len(set(bases)) == 1:
        bases = [learning_rate] * len(bases)
    planned = [base * rate(scheduler.last_epoch) for rate, base in zip(scheduler.lr_lambdas, bases)]
    groups = optimizer.param_groups
    if all(group["lr"] == lr for group, lr in zip(groups, planned)) and bases == scheduler.base_lrs:
        return None
    before = groups[0]["lr"]
    for group, base, lr in zip(groups, bases, planned):
        group["lr"] = lr
        group["initial_lr"] = base  # what LambdaLR reads as the base if it is ever rebuilt on this optimizer
    scheduler.base_lrs = bases
    scheduler._last_lr = planned  # what Trainer logs as the step's learning rate
    return before, planned[0]
