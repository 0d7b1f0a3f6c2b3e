"""Trust what it trains: resume identity, the router trains when asked, divergence stops, nothing is lost.

Every test goes through the real chain (`finetune` / `moetune train`, or `build_trainer`), not hand-built models.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetune.cli import main
from moetune.errors import MoetuneError, RecipeError, TrainingDiverged
from moetune.run_dir import CHECKPOINT_MARK, LOCK_FILE, RUN_MARK
from moetune.trainer import MoETrainer
from moetune.training import build_trainer, finetune


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN, DEMO_EVAL = str(REPO / "recipes/data/demo_train.jsonl"), str(REPO / "recipes/data/demo_eval.jsonl")


def make_recipe(model_dir, out, **sections):
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "moe": {"z_loss_coef": 0.001, "aux_loss_coef": 0.01},
        "data": {"train": DEMO_TRAIN, "max_length": 64},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1,
                  "save_steps": 2, "seed": 0, "disable_tqdm": True},
        "output": {"dir": str(out)},
    }
    recipe.update(sections)
    return recipe


def losses(run: Path) -> dict[int, float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(run / name)


def crash_at_step(monkeypatch, step: int) -> None:
    original, calls = MoETrainer.training_step, []

    def crash(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MoETrainer, "training_step", crash)


SETUPS = {
    "full": {},
    "freeze_non_experts": {"freeze": {"train": ["non_experts"]}},
    "lora_router_in_full": {"lora": {"r": 4, "targets": ["attention"]}, "freeze": {"train": ["router"]}},
    "qlora_experts": {"lora": {"r": 4, "targets": ["attention", "experts"]}, "quantization": {"bits": 4},
                      "model": None},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_resume_ends_with_the_same_weights(setup, tiny_model_dir, tmp_path, monkeypatch):
    """Killed after checkpoint-2 and resumed: same losses at every step and the same final weights."""
    model = tiny_model_dir("mixtral")
    sections = dict(SETUPS[setup])
    if sections.get("model", "") is None:
        sections["model"] = {"name_or_path": str(model), "dtype": "bfloat16"}
    straight, _ = finetune(make_recipe(model, tmp_path / "straight", **sections))

    interrupted = make_recipe(model, tmp_path / "resumed", **sections)
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed, _ = finetune(interrupted, resume=True)

    assert list(losses(resumed)) == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    a, b = saved_weights(straight), saved_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    if setup in ("full", "freeze_non_experts"):
        # The point of the fix: router and expert weights in the resumed model are the trained ones.
        base = load_file(model / "model.safetensors")
        trained_router = next(k for k in b if k.endswith("gate.weight") and "experts" not in k)
        assert not torch.equal(b[trained_router].float(), base[trained_router].float())


def test_stock_trainer_resume_still_drops_fused_weights(tiny_model_dir, tmp_path):
    """Canary for the upstream bug the checkpoint layout works around: when it fails, the workaround can go."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")  # what a stock Trainer checkpoint holds
    result = model.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert any("experts.gate_up_proj" in k for k in result.missing_keys)  # transformers 5.23: still lost


PRESET_CASES = [
    # (lora targets or None, freeze.train, groups that must change)
    (None, None, {"attention", "router", "experts", "norm", "embedding", "lm_head"}),
    (None, ["non_experts"], {"attention", "router", "norm", "embedding", "lm_head"}),
    (None, ["experts"], {"experts"}),
    (None, ["router"], {"router"}),
    (["attention"], None, {"adapter"}),
    (["attention"], ["router"], {"adapter", "router"}),
    (["attention"], ["experts"], {"adapter", "experts"}),
    (["experts"], ["non_experts"], {"adapter", "attention", "router", "norm", "embedding", "lm_head"}),
]


@pytest.mark.parametrize(("targets", "train", "changed"), PRESET_CASES)
def test_exactly_the_selected_groups_train(targets, train, changed, tiny_model_dir, tmp_path):
    """load_model -> add_adapters -> freeze -> MoETrainer (router_fp32 on, the default): what trains, changes."""
    from moetune.architectures import classify_parameters

    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "out", freeze={"train": train})
    recipe["train"].update(max_steps=2, save_strategy="no")
    if targets:
        recipe["lora"] = {"r": 4, "targets": targets}
    trainer = build_trainer(recipe)
    groups = classify_parameters(trainer.model)
    # PEFT's modules_to_save keeps the untouched original beside the trained copy: compare the copy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".original_module." not in n}
    trainer.train()
    moved = {groups[n] for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == changed


def test_overwrite_deletes_only_what_moetune_created(tiny_model_dir, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    recipe["train"].update(max_steps=1)
    finetune(recipe)
    assert (tmp_path / "run" / RUN_MARK).is_file()

    # a project folder whose recipe points output.dir at itself
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('precious')")
    recipe_file = project / "recipe.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(project)}}))
    monkeypatch.chdir(project)
    assert main(["train", str(recipe_file), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "refusing to delete" in err and "current directory" in err
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(recipe_file), "--overwrite"]) == 1
    assert "holds the recipe" in capsys.readouterr().err
    # another tool's output: not marked by moetune
    other = tmp_path / "other"
    (other / "checkpoint-5").mkdir(parents=True)
    (other / "trainer_state.json").write_text("{}")
    with pytest.raises(MoetuneError, match="moetune did not create it"):
        finetune(recipe, overrides=[f"output.dir={other}"], overwrite=True)
    # a moetune run into which the user put a file of their own
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(MoetuneError, match="files moetune did not write .*notes.txt"):
        finetune(recipe, overwrite=True)
    assert (project / "src" / "main.py").read_text() == "print('precious')"
    assert (other / "trainer_state.json").is_file() and (tmp_path / "run" / "notes.txt").is_file()

    (tmp_path / "run" / "notes.txt").unlink()
    _, metrics = finetune(recipe, overwrite=True)
    assert metrics["global_step"] == 1


def test_a_bad_train_value_costs_nothing(tiny_model_dir, tmp_path):
    """A finished run is not touched by an --overwrite whose `train` values TRL rejects."""
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    recipe["train"].update(max_steps=1)
    finetune(recipe)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RecipeError, match="trl.SFTConfig"):
        finetune(recipe, overrides=["train.lr_scheduler_type=sideways"], overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


def test_a_run_that_fails_before_training_does_not_block_the_rerun(tiny_model_dir, tmp_path):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run", freeze={"train": []})
    with pytest.raises(MoetuneError, match="nothing to train"):
        finetune(recipe)
    recipe["freeze"] = {"train": ["router"]}
    recipe["train"].update(max_steps=1)
    _, metrics = finetune(recipe)  # no --overwrite needed
    assert metrics["global_step"] == 1


@pytest.mark.parametrize("override", ["moe.aux_loss_coef=1e38", "train.learning_rate=1e30"])
def test_divergence_stops_the_run_and_saves_no_broken_model(override, tiny_model_dir, tmp_path, capsys):
    import yaml

    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    recipe["train"].update(max_steps=6, save_steps=1, max_grad_norm=0.0)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(recipe_file), "--set", override]) == TrainingDiverged.exit_code
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "Traceback" not in err and "learning_rate" in err
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists() and not (run / "metrics.json").exists()
    for checkpoint in run.glob("checkpoint-*"):  # whatever was checkpointed is finite
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_resume_skips_a_half_written_checkpoint(tiny_model_dir, tmp_path, capsys):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    crash = dict(recipe)
    crash["train"] = {**recipe["train"], "max_steps": 2}
    finetune(crash)
    run = tmp_path / "run"
    # a checkpoint killed mid-save: weights half written, no trainer state, no completion mark
    broken = run / "checkpoint-3"
    broken.mkdir()
    data = (run / "checkpoint-2" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    (run / RUN_MARK).write_text(json.dumps({"created_by": "moetune", "status": "running"}))
    _, metrics = finetune(recipe, resume=True)
    out = capsys.readouterr().out
    assert "skipped checkpoint-3" in out and "continuing from" in out and "checkpoint-2" in out
    assert metrics["global_step"] == 4 and list(losses(run)) == [1, 2, 3, 4]
    assert (run / "checkpoint-4" / CHECKPOINT_MARK).is_file()


def test_resume_of_a_finished_run_changes_nothing_unless_asked_for_more(tiny_model_dir, tmp_path, capsys):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    _, first = finetune(recipe)
    run = tmp_path / "run"
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    out, again = finetune(recipe, resume=True)
    assert again == first and "already finished at step 4; nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in snapshot} == snapshot

    # A changed setup is refused and leaves the run as it was.
    with pytest.raises(RecipeError, match="lora section"):
        finetune(recipe, overrides=["lora.r=4"], resume=True)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    with pytest.raises(RecipeError, match=r"`distributed.strategy` is 'ddp' but .* trained with 'auto'"):
        finetune(recipe, overrides=["distributed.strategy=ddp"], resume=True)
    with pytest.raises(RecipeError, match=r"`distributed.expert_parallel` is 2 but .* trained with 1"):
        finetune(recipe, overrides=["distributed.expert_parallel=2"], resume=True)
    assert {p: p.read_bytes() for p in snapshot} == snapshot

    _, more = finetune(recipe, overrides=["train.max_steps=6"], resume=True)
    assert more["global_step"] == 6 and list(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_a_second_run_into_a_busy_dir_is_refused(tiny_model_dir, tmp_path):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    recipe["train"].update(max_steps=1)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} on test (moetune train other.yaml)'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MoetuneError, match=f"in use by pid {holder.pid} "):
            finetune(recipe)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    _, metrics = finetune(recipe)  # the kernel dropped the dead holder's lock
    assert metrics["global_step"] == 1
    assert os.path.getsize(run / LOCK_FILE) == 0


def test_ranks_checking_the_run_dir_at_the_same_instant_do_not_refuse_each_other(tmp_path):
    """Every rank of a launch checks the dir at start; another rank's probe of the lock must not read as a busy dir
    (it did, now and then, on 2-rank resumes). A run that holds the lock is still refused."""
    import fcntl

    from moetune.run_dir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    other_rank = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other_rank, fcntl.LOCK_SH)  # what a rank's probe holds for that instant
    try:
        RunDir(run).check(resume=False, overwrite=False)
    finally:
        os.close(other_rank)
    running = os.open(run / LOCK_FILE, os.O_RDWR)
    fcntl.flock(running, fcntl.LOCK_EX)
    try:
        with pytest.raises(MoetuneError, match="is in use by"):
            RunDir(run).check(resume=False, overwrite=False)
    finally:
        os.close(running)


def test_validate_checks_what_train_checks(tiny_model_dir, tmp_path, capsys):
    """`train` values that TRL rejects only when building its config fail `moetune validate` too, with exit 2."""
    import yaml

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")))
    assert main(["validate", str(recipe_file)]) == 0
    bad = ["--set", "train.lr_scheduler_type=sideways"]
    assert main(["validate", str(recipe_file), *bad]) == 2
    assert main(["train", str(recipe_file), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("`train` is not a valid trl.SFTConfig") == 2 and "sideways" in err
    assert not (tmp_path / "run").exists()
    assert main(["validate", str(recipe_file), "--schema-only", *bad]) == 0  # the instant check cannot see it


def test_a_moved_run_dir_resumes(tiny_model_dir, tmp_path, monkeypatch):
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "here")
    straight, _ = finetune(make_recipe(tiny_model_dir("mixtral"), tmp_path / "straight"))
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    (tmp_path / "here").rename(tmp_path / "there")
    monkeypatch.chdir(tmp_path / "there")  # and from another working directory
    moved, metrics = finetune(recipe, overrides=[f"output.dir={tmp_path / 'there'}"], resume=True)
    assert metrics["global_step"] == 4 and losses(moved) == pytest.approx(losses(straight), rel=1e-5)


def test_an_output_dir_that_cannot_be_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import yaml

    a_file = tmp_path / "a_file"
    a_file.write_text("not a dir")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(make_recipe(tiny_model_dir("mixtral"), a_file / "run")))
    assert main(["train", str(recipe_file)]) == 1
    assert f"is under {a_file}, which is a file" in capsys.readouterr().err
    assert a_file.read_text() == "not a dir"

    # root may write anywhere, so a read-only dir is simulated at the permission check itself
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["train", str(recipe_file), "--set", f"output.dir={tmp_path / 'ro' / 'run'}"]) == 1
    assert "is not writable by this user" in capsys.readouterr().err


def test_overwrite_accepts_every_file_moetune_writes(tmp_path):
    """Files other modules write into a run dir (ESFT's slices, expert scores) never block `--overwrite`."""
    from moetune.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    with run.claim(resume=False, overwrite=False):
        pass
    for name in ("expert_selection.json", "esft_experts.safetensors", "expert_scores.png", "routing.png",
                 "adapter_model.safetensors", "README.md", "recipe.yaml", "metrics.json"):
        (tmp_path / "run" / name).write_text("x")
    (tmp_path / "run" / "checkpoint-2").mkdir()
    run.check(resume=False, overwrite=True)  # no refusal
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(MoetuneError, match="notes.txt"):
        run.check(resume=False, overwrite=True)


@pytest.mark.parametrize("written_by", ["save_only_model", "expert_parallel"])
def test_resume_refuses_a_checkpoint_without_optimizer_state(tiny_model_dir, tmp_path, written_by):
    """Trainer resumes from such a checkpoint by silently restarting AdamW and the schedule: refused, nothing lost."""
    recipe = make_recipe(tiny_model_dir("mixtral"), tmp_path / "run")
    if written_by == "save_only_model":
        recipe["train"] = {**recipe["train"], "save_only_model": True}
    first = dict(recipe)
    first["train"] = {**recipe["train"], "max_steps": 2}
    finetune(first)
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    if written_by == "expert_parallel":  # what an expert-parallel run writes: DCP shards instead of optimizer.pt
        (checkpoint / "optimizer.pt").unlink()
        (checkpoint / "ep_state").mkdir()
        (checkpoint / "ep_state" / ".metadata").write_bytes(b"")
    assert not (checkpoint / "optimizer.pt").exists()
    (run / RUN_MARK).write_text(json.dumps({"created_by": "moetune", "status": "running"}))  # as if killed
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    with pytest.raises(MoetuneError, match="train.save_only_model" if written_by == "save_only_model"
                       else "distributed.expert_parallel"):
        finetune(recipe, resume=True)
    after = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    assert after == before  # the checkpoint and everything else are still there
