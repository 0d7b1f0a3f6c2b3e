"""--resume follows the resumed recipe's learning-rate schedule: training a finished run longer (or at another
learning rate) neither trains a step at the old schedule's last rate nor ignores the new `learning_rate`."""

import json

import pytest
import torch
from test_trust import crash_at_step, make_recipe

from moetune.resume_schedule import follow_recipe_schedule
from moetune.training import finetune


def _rates(run):
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}


def test_training_a_finished_run_longer_continues_on_the_new_schedule(tiny_model_dir, tmp_path, caplog):
    model = tiny_model_dir("mixtral")
    straight = make_recipe(model, tmp_path / "straight")  # 4 steps, linear decay from 3e-3
    finetune(straight)
    short = make_recipe(model, tmp_path / "longer")
    short["train"].update(max_steps=2)
    finetune(short)
    assert _rates(tmp_path / "longer") == {1: 3e-3, 2: 1.5e-3}  # a 2-step decay: it ended at 0
    finetune(short, overrides=["train.max_steps=4"], resume=True)

    # Steps 3 and 4 train at what a 4-step run has there (transformers alone: 0, then 7.5e-4).
    assert _rates(tmp_path / "longer")[3] == pytest.approx(_rates(tmp_path / "straight")[3]) == 1.5e-3
    assert _rates(tmp_path / "longer")[4] == pytest.approx(_rates(tmp_path / "straight")[4]) == 7.5e-4
    assert "the next step trains at 0.0015, where the checkpoint's optimizer was at 0" in caplog.text

    # A new learning rate on resume is the base from then on (transformers alone keeps the checkpoint's).
    finetune(short, overrides=["train.max_steps=6", "train.learning_rate=6e-4"], resume=True)
    assert _rates(tmp_path / "longer")[5] == pytest.approx(6e-4 * 2 / 6)
    assert _rates(tmp_path / "longer")[6] == pytest.approx(6e-4 * 1 / 6)


def test_resuming_the_same_plan_changes_no_rate_and_says_nothing(tiny_model_dir, tmp_path, monkeypatch, caplog):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    finetune(recipe, resume=True)
    assert _rates(tmp_path / "run") == pytest.approx({1: 3e-3, 2: 2.25e-3, 3: 1.5e-3, 4: 7.5e-4}, rel=1e-12)
    assert "learning rate follows" not in caplog.text


def _scheduled(bases, lambdas, step):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in bases]
    optimizer = torch.optim.SGD([{"params": [p], "lr": b} for p, b in zip(params, bases)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_an_unchanged_plan_is_left_exactly_as_the_checkpoint_had_it():
    optimizer, scheduler = _scheduled([0.1], [lambda s: 1 - s / 10], 3)
    assert follow_recipe_schedule(optimizer, scheduler, 0.1) is None
    assert optimizer.param_groups[0]["lr"] == 0.1 * (1 - 3 / 10)


def test_groups_with_their_own_bases_keep_them_and_other_schedulers_are_left_alone():
    optimizer, scheduler = _scheduled([0.1, 0.2], [lambda s: 1.0, lambda s: 1.0], 2)
    scheduler.lr_lambdas = [lambda s: 0.5, lambda s: 0.5]  # the rebuilt schedule of a resumed recipe
    assert follow_recipe_schedule(optimizer, scheduler, 0.3) == (0.1, 0.05)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.1]
    assert scheduler.get_last_lr() == [0.05, 0.1]

    optimizer, _ = _scheduled([0.1], [lambda s: 1.0], 0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    assert follow_recipe_schedule(optimizer, plateau, 0.5) is None and optimizer.param_groups[0]["lr"] == 0.1
