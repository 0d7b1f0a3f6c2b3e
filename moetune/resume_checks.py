"""What a `--resume` may change: the recipe a run was trained with against the one it is resumed with.

Checkpoints only fit the setup that wrote them (the model, its quantization and adapters, what trains, and the
engine whose format holds the optimizer state); a resume may ask for more training, nothing else.
"""

from moetune.config import Recipe, load_recipe
from moetune.errors import RecipeError
from moetune.run_dir import RunDir


_SETUP_SECTIONS = ("model", "quantization", "lora", "freeze", "experts")


def stored_recipe(run: RunDir) -> Recipe | None:
    """The recipe the run in `run` was trained with (its recipe.yaml), or None when it has none."""
    stored_file = run.path / "recipe.yaml"
    return load_recipe(stored_file) if stored_file.is_file() else None


def check_same_setup(recipe: Recipe, stored: Recipe | None, run: RunDir) -> None:
    """Raise RecipeError naming what `recipe` changes that the run's checkpoints cannot follow."""
    if stored is None:
        return
    changed = [s for s in _SETUP_SECTIONS if getattr(stored, s) != getattr(recipe, s)]
    if changed:
        raise RecipeError(
            f"--resume: the recipe's {', '.join(changed)} section(s) differ from the run in {run.path} "
            f"({run.path / 'recipe.yaml'}); its checkpoints only fit the setup they were trained with. Resume with the same "
            "sections, or start a new run elsewhere"
        )
    # The engine decides the checkpoint's optimizer format (DDP's optimizer.pt, FSDP2's sharded optimizer folder,
    # DeepSpeed's global_step shards, expert parallelism's DCP shards): another engine cannot read it.
    for key in ("strategy", "expert_parallel"):
        old, new = getattr(stored.distributed, key), getattr(recipe.distributed, key)
        if old != new:
            raise RecipeError(
                f"--resume: `distributed.{key}` is {new!r} but the run in {run.path} was trained with {old!r}; its "
                "checkpoints hold the optimizer state in that engine's format. Resume with the same value, or start "
                "a new run elsewhere"
            )


def asks_for_more(recipe: Recipe, stored: Recipe | None) -> bool:
    """Whether a --resume of a finished run asks for more training than the run did."""
    stored_train = stored.train if stored is not None else {}
    for key in ("max_steps", "num_train_epochs"):
        new, old = recipe.train.get(key), stored_train.get(key)
        if new is not None and (old is None or new > old):
            return True
    return False
