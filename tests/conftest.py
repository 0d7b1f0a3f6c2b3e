"""Shared fixtures: tiny MoE models written to disk once per test session, and loaded the real way."""

import os
from pathlib import Path

import pytest
import torch


# Tests never reach the Hub; fail fast instead of retrying for 25 s when something tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenized data is cached under the datasets cache: tests keep theirs out of the user's (subprocesses inherit it).
if "HF_DATASETS_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="moetune-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir("mixtral") -> Path`: a tiny random model + tokenizer directory, built once per session.

    Extra keyword arguments are config overrides; each distinct combination gets its own directory.
    """
    from moetune.tiny import make_tiny

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in key[1])
            cache[key] = make_tiny(arch, root / name, **overrides)
        return cache[key]

    return get
