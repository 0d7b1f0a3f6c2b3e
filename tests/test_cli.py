"""The CLI end to end, in process: each subcommand over its library function, user mistakes as clean errors."""

import json
from pathlib import Path

import yaml

from moetune.cli import main


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN, DEMO_EVAL = str(REPO / "recipes/data/demo_train.jsonl"), str(REPO / "recipes/data/demo_eval.jsonl")


def _recipe(tmp_path: Path, model_dir: Path, **sections) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "targets": ["attention"]},
        "data": {"train": DEMO_TRAIN, "eval": DEMO_EVAL, "max_length": 64},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2,
                  "disable_tqdm": True},
        "output": {"dir": str(tmp_path / "out")},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_validate_ok_and_overrides(tiny_model_dir, tmp_path, capsys):
    path = _recipe(tmp_path, tiny_model_dir("mixtral"))
    assert main(["validate", str(path), "--set", "train.learning_rate=1e-4"]) == 0
    assert "OK" in capsys.readouterr().out


def test_bad_recipe_exits_2_naming_the_keys(tiny_model_dir, tmp_path, capsys):
    path = _recipe(tmp_path, tiny_model_dir("mixtral"), lora={"r": 0, "rank": 8})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lora.r" in err and "lora.rank" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_train_then_refuse_to_clobber(tiny_model_dir, tmp_path, capsys):
    path = _recipe(tmp_path, tiny_model_dir("mixtral"))
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert main(["train", str(path)]) != 0
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err


def test_routing_command(tiny_model_dir, tmp_path, capsys):
    assert main(["routing", str(tiny_model_dir("qwen3_moe")), DEMO_EVAL, "--max-examples", "16", "--json",
                 "--out", str(tmp_path / "routing")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "routing" / "routing.json").exists() and (tmp_path / "routing" / "routing.png").exists()
    assert json.loads((tmp_path / "routing" / "routing.json").read_text()) == report


def test_inspect_quantize_4bit_measures_resident_bytes(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir("mixtral")), "--quantize", "4bit", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resident_bytes"] < report["estimated_bytes_bf16"]
    # 4 bits of code plus quantization state; the fixed per-tensor state weighs more on a tiny model (0.52 at 1B scale)
    assert 0.5 < report["groups"]["experts"]["resident_bytes"] / report["groups"]["experts"]["params"] < 0.65
    assert report["groups"]["router"]["resident_bytes"] == 4 * report["groups"]["router"]["params"]  # fp32 router
    assert report["bytes_per_param"] == report["resident_bytes"] / report["total_params"]


def test_a_process_in_a_group_leaves_with_its_exit_code(tmp_path):
    """`moetune.cli.run` tears the process group down and leaves with os._exit (gloo can abort at interpreter exit,
    docs/upstream.md#gloo-exit-abort); the exit code and the error line must survive that."""
    import subprocess
    import sys

    script = (
        "import torch.distributed as dist, atexit, sys\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "from moetune.cli import run\n"
        f"run(['validate', '{tmp_path / 'missing.yaml'}', '--schema-only'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "recipe file not found" in result.stderr and "atexit ran" not in result.stdout  # left by os._exit
