"""What `moetune train` prints: the data report, one compact line per logging step, one summary, and none of
the third-party noise (raw log dicts, dataset-prep bars, weight-loading bars, the bitsandbytes kernels warning)."""

from pathlib import Path

import pytest
import yaml

from moetune.cli import main


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_recipe(tiny_model_dir, tmp_path):
    """recipes/demo.yaml on the test's tiny Mixtral, cut to 6 steps with a line every 2."""
    recipe = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tiny_model_dir("mixtral"))
    recipe["data"].update(train=str(REPO / recipe["data"]["train"]), eval=str(REPO / recipe["data"]["eval"]))
    recipe["train"].update(max_steps=6, logging_steps=2, save_steps=6, warmup_steps=0)
    recipe["output"] = {"dir": str(tmp_path / "run"), "sample_prompts": 0}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_prints_one_line_per_logging_step_and_one_summary(demo_recipe, capfd):
    assert main(["train", str(demo_recipe)]) == 0
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    for line in steps:
        assert all(f" {key} " in line for key in ("loss", "aux", "z", "grad", "lr", "routing")) and "tok/s" in line
    assert [line.split()[2] for line in lines if line.startswith("eval step")] == ["0/6", "6/6"]
    assert sum(line.startswith("Done: ") for line in lines) == 1 and "metrics.json" in lines[-1]
    assert out.count("train: ") == 1 and out.count("eval: ") == 1  # the data report
    assert "; a fixed sample of 114 of 600 rows (enough for train.max_steps)" in out  # 6 steps x 8 rows, plus the margin
    text = out + err
    for noise in ("{'loss'", "'train_runtime'", "Building labels", "Truncating", "Loading weights", "Writing model shards",
                  "gemm_4bit_forward", "\r"):
        assert noise not in text
    assert len(lines) <= 20 + sum(line.startswith("WARNING moetune.telemetry") for line in lines)


def test_quiet_prints_the_summary_only(demo_recipe, capfd):
    assert main(["train", str(demo_recipe), "-q"]) == 0
    out, err = capfd.readouterr()
    assert [line for line in out.splitlines() if line.strip()] == [next(line for line in out.splitlines() if line.startswith("Done: "))]
    assert all(line.startswith("WARNING ") for line in err.splitlines())


def test_deepspeeds_cpu_detection_line_is_dropped_and_its_other_messages_kept():
    import logging

    from moetune.console import quiet_third_party

    quiet_third_party()
    logger, seen = logging.getLogger("DeepSpeed"), []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in seen] == ["something else"]
