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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from bagel_core.config.processes import pid_alive


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
    for pid in tree + [p for q in tree if pid_alive(q) for p in descendants(q)]:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TorchrunJob:
    """The torchrun agents of one training (one per node; all on this machine for a loopback launch)."""

    agents: list[subprocess.Popen]

    def poll(self) -> int | None:
        """None while any agent runs; then the first non-zero exit code, else 0."""
        codes = [a.poll() for a in self.agents]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)


class LocalTorchrunLauncher(dg.ConfigurableResource):
    """Runs torchrun on this machine: one agent (``--standalone``), or ``nnodes`` agents on loopback with
    a c10d rendezvous (a multi-node launch rehearsed on one host). Output goes to one log file."""

    termination_grace_s: float = 60.0  # time torchrun gets to stop its ranks before SIGKILL (FSDP: 60-120 s)

    def commands(self, nnodes: int, nproc_per_node: int, train_args: list[str]) -> list[list[str]]:
        """One torchrun per node, as argv[0] (through this interpreter), never under a shell that would
        swallow signals."""
        tail = [f"--nproc_per_node={nproc_per_node}", "-m", "bagel_core.train", *train_args]
        base = [sys.executable, "-m", "torch.distributed.run"]
        if nnodes == 1:
            return [[*base, "--standalone", *tail]]
        rendezvous = [
            f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            f"--rdzv_id=bagel-{os.getpid()}-{time.monotonic_ns()}",
        ]  # fmt: skip
        return [[*base, *rendezvous, f"--node_rank={rank}", *tail] for rank in range(nnodes)]

    def start(self, commands: list[list[str]], log_path: Path, env: dict[str, str] | None = None) -> TorchrunJob:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        agents = []
        for command in commands:
            with open(log_path, "ab") as log:
                agents.append(
                    subprocess.Popen(
                        command,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **(env or {})},
                        start_new_session=True,
                    )
                )
        return TorchrunJob(agents)

    def stop(self, job: TorchrunJob) -> list[int]:
        """Stop every agent with its ranks and DataLoader workers; returns the pids that needed SIGKILL."""
        return [
            pid
            for agent in job.agents
            if agent.poll() is None
            for pid in terminate_tree(agent, self.termination_grace_s)
        ]
