"""`moetune --version` and `moetune env`: the facts a bug report needs, even on a half-installed machine."""

import importlib.metadata
import json
import platform

import pytest

import moetune
from moetune.cli import main
from moetune.env import NOT_INSTALLED, PACKAGES, collect_env, format_env


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"moetune {moetune.__version__}\n"


def test_env_lists_every_package_and_the_machine(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "```" and lines[-1] == "```"  # pasteable into an issue as is
    for name in PACKAGES:
        assert any(line.startswith(f"- {name}: ") for line in lines), name
    assert f"- transformers: {importlib.metadata.version('transformers')}" in lines
    assert f"- moetune: {moetune.__version__} (" in out
    assert f"- python: {platform.python_version()}" in lines
    assert any(line.startswith("- torch build: ") for line in lines) and any(line.startswith("- GPUs: ") for line in lines)


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["packages"]) == set(PACKAGES)
    assert report["cpu_count"] >= 1 and isinstance(report["torch"]["devices"], list)
    import torch

    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_env_survives_missing_packages(monkeypatch):
    real = importlib.metadata.version
    missing = {"peft", "deepspeed", "torch"}

    def version(name):
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    report = collect_env()
    assert {name for name, v in report["packages"].items() if v == NOT_INSTALLED} == missing
    assert report["torch"] is None  # not imported when its metadata is missing
    text = format_env(report)
    assert "- peft: not installed" in text and "- torch: not installed" in text
    assert f"- trl: {real('trl')}" in text and "torch build" not in text
