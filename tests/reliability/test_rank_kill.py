"""A rank SIGKILLed mid-step (a node lost, the OOM killer): torchrun notices, stops the surviving rank and every
DataLoader worker within a bounded time and exits non-zero; ``--auto_resume True`` then continues from the last
complete checkpoint with the per-step losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packed_fixtures import small_fixture
from train_fixtures import ROOT, records, torchrun, torchrun_env, train_args

from assets.launcher import descendants
from bagel_core.config.processes import pid_alive
from bagel_core.train.checkpoint import complete_steps

STOP_WITHIN_S = 60


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("rank_kill") / "data")


def _rank_pids(agent: int) -> list[int]:
    """torchrun's rank processes (its direct children running bagel_core.train)."""
    ranks = []
    for pid in descendants(agent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"bagel_core.train" in cmdline and b"torch.distributed.run" not in cmdline:
            ranks.append(pid)
    return ranks


def test_killing_one_rank_stops_the_run_promptly_and_auto_resume_matches_the_straight_run(fx, tmp_path, fault):
    common = {"num_workers": 1, "total_steps": 4, "save_every": 2, "log_every": 1}
    straight = torchrun(2, train_args(fx, tmp_path / "straight", **common), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "bagel_core.train", *train_args(fx, run, **common)]  # fmt: skip
    agent = subprocess.Popen(command, env=torchrun_env(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and 2 not in complete_steps(run / "ckpt"):
        time.sleep(0.05)
    assert 2 in complete_steps(run / "ckpt"), "the run never saved step 2"
    tree = [agent.pid, *descendants(agent.pid)]
    victim = max(_rank_pids(agent.pid))  # one rank only; the other and all workers must be stopped by torchrun
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code = agent.wait(timeout=STOP_WITHIN_S + 30)
    took = time.monotonic() - killed_at
    assert code != 0 and took < STOP_WITHIN_S, (code, took)
    time.sleep(1)
    assert [pid for pid in tree if pid_alive(pid)] == []  # the surviving rank and every worker are gone

    resumed = torchrun(2, [*train_args(fx, run, **common), "--auto_resume", "True"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = records(tmp_path / "straight" / "results"), records(run / "results")
    assert [want[s]["loss"] for s in (3, 4)] == [got[s]["loss"] for s in (3, 4)]  # bit-exact continuation
    fault(
        "SIGKILL of one of two ranks mid-step (after step 2 was saved)",
        f"torchrun exits {code} after {took:.1f} s with the other rank and all DataLoader workers gone; "
        "auto_resume continues from step 2 with the same per-step losses as an uninterrupted run",
    )
