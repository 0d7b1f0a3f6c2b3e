"""The output directory of a run: what moetune may write, delete and resume there, and who holds it.

moetune deletes only what it created. A run dir is marked (`.moetune-run.json`) when moetune creates or first
writes into it; `--overwrite` refuses any folder without that mark, and any marked folder that holds files
moetune does not write (a project's `src/`, another tool's output). A lock (`.moetune.lock`, an `flock` that the
kernel drops when the process dies) refuses a second run into a busy dir. A checkpoint counts as complete only
when moetune has marked it after the trainer finished writing it, so a process killed mid-save never leaves a
checkpoint that `--resume` would crash on.

Nothing here imports torch: every check runs before any heavy work starts.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from moetune.errors import MoetuneError


RUN_MARK = ".moetune-run.json"
LOCK_FILE = ".moetune.lock"
CHECKPOINT_MARK = ".moetune-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# What moetune and the Trainer write at the top of a run dir. Anything else makes `--overwrite` refuse.
_OURS = re.compile(
    r"^(checkpoint-\d+(\.incomplete-\d+)?|runs|adapter_config\.json|adapter_model\.(safetensors|bin)|"
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|config\.json|"
    r"generation_config\.json|tokenizer.*|special_tokens_map\.json|chat_template\.(jinja|json)|vocab\.json|"
    r"merges\.txt|added_tokens\.json|training_args\.bin|trainer_state\.json|metrics\.json|data_report\.json|"
    r"routing.*\.(json|png)|recipe\.yaml|README\.md|(all|train|eval)_results\.json|"
    r"expert_selection\.json|esft_experts\.safetensors|expert_scores\.png|"
    r"\.moetune-run\.json|\.moetune\.lock|\.moetune-.*)$"
)
# Files a run writes before training starts; a dir holding only these is a run that failed early.
_EARLY = {RUN_MARK, LOCK_FILE, "recipe.yaml"}


class RunDir:
    """One run's output directory. `check()` decides, `claim()` acts; see the module docstring."""

    def __init__(self, path: str | Path, *, recipe_file: str | Path | None = None):
        self.path = Path(path).expanduser()
        self.recipe_file = Path(recipe_file).expanduser() if recipe_file else None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------- state

    def mark(self) -> dict | None:
        """The run mark's content, or None when moetune never marked this dir."""
        try:
            return json.loads((self.path / RUN_MARK).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def finished(self) -> dict | None:
        """`{"global_step": N, ...}` when a run finished here (its final model and metrics.json written)."""
        mark = self.mark() or {}
        if mark.get("status") == "finished" and (self.path / "metrics.json").is_file():
            return mark
        return None

    def checkpoints(self) -> list[Path]:
        """checkpoint-N dirs, oldest first."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
        return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))

    def last_complete_checkpoint(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(newest complete checkpoint or None, [(newer incomplete checkpoint, why)])."""
        skipped = []
        strict = self.mark() is not None  # moetune marks every checkpoint it finished writing in a run it marked
        for checkpoint in reversed(self.checkpoints()):
            why = checkpoint_problem(checkpoint, strict=strict)
            if why is None:
                return checkpoint, skipped
            skipped.append((checkpoint, why))
        return None, skipped

    def _is_early_failure(self) -> bool:
        """A marked dir that holds nothing but what a run writes before training: safe to start again in."""
        names = {p.name for p in self.path.iterdir()} - {LOCK_FILE}
        return not names or self.mark() is not None and names <= _EARLY

    # ------------------------------------------------------------------------------------------- checks

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Raise `MoetuneError` if this run may not use the dir as asked. Changes nothing."""
        if resume and overwrite:
            raise MoetuneError("--resume and --overwrite contradict each other: pick one")
        self._check_writable()
        self._check_not_busy()
        exists_nonempty = self.path.is_dir() and any(self.path.iterdir())
        if resume:
            if not self.path.is_dir():
                raise MoetuneError(f"--resume: output dir {self.path} does not exist, so there is nothing to resume")
            checkpoint, skipped = self.last_complete_checkpoint()
            if self.finished() is None and checkpoint is None:
                extra = f" ({len(skipped)} incomplete checkpoint(s) skipped)" if skipped else ""
                raise MoetuneError(f"--resume: no complete checkpoint-N directory in {self.path} to resume from{extra}")
            return
        if not exists_nonempty or self._is_early_failure():
            return
        if not overwrite:
            raise MoetuneError(
                f"output dir {self.path} is not empty: pass --resume to continue from its last checkpoint, "
                "--overwrite to delete it and start over (or resume=True / overwrite=True in Python), or set "
                "output.dir elsewhere"
            )
        self._check_overwrite_allowed()

    def _check_writable(self) -> None:
        existing = self.path
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            what = "is a file" if existing == self.path else f"is under {existing}, which is a file"
            raise MoetuneError(f"output.dir {self.path} {what}: give a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise MoetuneError(f"output.dir {self.path}: {existing} is not writable by this user")

    def _check_not_busy(self) -> None:
        if self._lock_fd is None and (self.path / LOCK_FILE).is_file():
            # A shared probe: it fails only against a run holding the lock, never against another rank of this
            # launch probing at the same instant (an exclusive probe made such a rank fail now and then).
            fd = self._open_locked(fcntl.LOCK_SH)  # raises, naming the holder, when another process runs here
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_overwrite_allowed(self) -> None:
        resolved = self.path.resolve()
        cwd = Path.cwd().resolve()
        protected = {cwd: "the current directory", Path.home().resolve(): "your home directory"}
        if resolved in protected or resolved in cwd.parents:
            what = protected.get(resolved, "a parent of the current directory")
            raise MoetuneError(f"--overwrite: refusing to delete {self.path}: it is {what}")
        if self.recipe_file is not None and resolved in self.recipe_file.resolve().parents:
            raise MoetuneError(f"--overwrite: refusing to delete {self.path}: it holds the recipe {self.recipe_file}")
        if self.mark() is None:
            raise MoetuneError(
                f"--overwrite: refusing to delete {self.path}: moetune did not create it (no {RUN_MARK}). "
                "Delete it yourself if it really should go, or set output.dir elsewhere"
            )
        unknown = sorted(p.name for p in self.path.iterdir() if not _OURS.match(p.name))
        if unknown:
            raise MoetuneError(
                f"--overwrite: refusing to delete {self.path}: it holds files moetune did not write "
                f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}). Move them out first"
            )

    # ------------------------------------------------------------------------------------------- actions

    @contextmanager
    def claim(self, *, resume: bool, overwrite: bool):
        """Create and lock the dir for this run (main process only), emptying it first with `overwrite`.

        Re-checks under the lock, so two runs started together cannot both pass. Incomplete checkpoints are
        renamed aside on `resume` (the Trainer would count them when it rotates old checkpoints).
        Yields the skipped checkpoints as `[(path, why)]`.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if self.mark() is None and not any(p.name != LOCK_FILE for p in self.path.iterdir()):
            self._write_mark(status="created")
        self._take_lock()
        try:
            self.check(resume=resume, overwrite=overwrite)
            if overwrite:
                for item in self.path.iterdir():
                    if item.name not in (LOCK_FILE, RUN_MARK):
                        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
                self._write_mark(status="created")
            skipped = []
            if resume:
                _, skipped = self.last_complete_checkpoint()
                for checkpoint, _why in skipped:
                    checkpoint.rename(checkpoint.with_name(f"{checkpoint.name}.incomplete-{int(time.time())}"))
            yield skipped
        finally:
            self._release_lock()

    def set_status(self, status: str, **fields) -> None:
        self._write_mark(status=status, **fields)

    def _write_mark(self, **fields) -> None:
        mark = {**(self.mark() or {}), "created_by": "moetune", **fields}
        mark.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_atomic(self.path / RUN_MARK, json.dumps(mark, indent=2) + "\n")

    def _take_lock(self) -> None:
        fd = self._open_locked()
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:200]
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode())
        self._lock_fd = fd

    def _open_locked(self, mode: int = fcntl.LOCK_EX) -> int:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise MoetuneError(f"output dir {self.path} is in use by {holder}; wait for it to finish, or set "
                               "output.dir elsewhere") from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def checkpoint_problem(checkpoint: Path, *, strict: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete.

    `strict`: only moetune's completion mark counts. Otherwise (a dir from another tool) a checkpoint with its
    trainer state and weights is accepted: the Trainer writes trainer_state.json after everything else.
    """
    if (checkpoint / CHECKPOINT_MARK).is_file():
        return None
    if strict:
        return "not marked complete (the process stopped while writing it)"
    if not (checkpoint / "trainer_state.json").is_file():
        return "no trainer_state.json (the process stopped while writing it)"
    # Written by another tool or an older moetune: accept what has weights, optimizer and state.
    weights = [n for n in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                           "pytorch_model.bin", "adapter_model.bin") if (checkpoint / n).is_file()]
    if not weights:
        return "no model or adapter weights"
    return None


def mark_checkpoint_complete(checkpoint: Path) -> None:
    (checkpoint / CHECKPOINT_MARK).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n", encoding="utf-8")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
