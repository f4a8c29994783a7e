"""Launching ``torchrun -m bagel_core.train`` from a Dagster step, and stopping it completely.

The local launcher starts torchrun in a session of its own with stdout and stderr going to a log file
(the asset tails it into the Dagster log), and stops it on cancellation or failure by SIGTERM to
torchrun (its agent forwards it to the ranks), then SIGKILL to every process that was below it.
Walking the process tree matters: torch elastic starts each rank with ``start_new_session=True``, so
signalling torchrun's process group alone would leave the ranks and their DataLoader workers running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from ``/proc`` (children of children included)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purposes
    return True


def terminate_tree(proc: subprocess.Popen, grace_s: float) -> list[int]:
    """Stop ``proc`` and everything below it: SIGTERM, up to ``grace_s`` seconds, then SIGKILL.
    Returns the pids that had to be killed."""
    tree = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    killed = []
    for pid in tree + [p for q in tree if alive(q) for p in descendants(q)]:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return killed


class LocalTorchrunLauncher(dg.ConfigurableResource):
    """Runs torchrun on this machine, one node (``--standalone``); stdout and stderr go to a log file."""

    termination_grace_s: float = 60.0  # time torchrun gets to stop its ranks before SIGKILL (FSDP: 60-120 s)

    def command(self, nproc_per_node: int, train_args: list[str]) -> list[str]:
        """torchrun as argv[0] (through this interpreter), never under a shell that would swallow signals."""
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "bagel_core.train", *train_args,
        ]  # fmt: skip

    def start(self, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def stop(self, proc: subprocess.Popen) -> list[int]:
        return terminate_tree(proc, self.termination_grace_s)
