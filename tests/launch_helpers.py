"""Helpers for the tests that launch several ranks: a free port, and what a failed launch printed.

On failure the launcher interleaves the ranks' output and names the first rank to fail as the root cause; the tail of stderr
is usually the other rank's broken-pipe error. Each rank's own last lines say what went wrong.
"""

import re
import socket
import subprocess


_RANK_PREFIX = re.compile(r"^\[rank(\d+)\]:")


def free_port() -> int:
    """A port nobody listens on now (fixed ports collide with a run still closing, or another test session)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_text(result: subprocess.CompletedProcess, *, lines_per_rank: int = 40) -> str:
    """Each rank's last lines (the launcher prefixes them `[rankN]:`), then the rest of the output's tail."""
    by_rank: dict[str, list[str]] = {}
    untagged: list[str] = []
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        match = _RANK_PREFIX.match(line)
        (by_rank.setdefault(match.group(1), []) if match else untagged).append(line)
    parts = [f"exit code {result.returncode}"]
    for rank in sorted(by_rank, key=int):
        parts.append(f"--- rank {rank}, last lines ---\n" + "\n".join(by_rank[rank][-lines_per_rank:]))
    parts.append("--- untagged output, last lines ---\n" + "\n".join(untagged[-lines_per_rank * 2:]))
    return "\n".join(parts)
