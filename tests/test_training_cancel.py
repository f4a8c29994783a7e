"""Trainings driven the way the UI drives them (the webserver's GraphQL API): terminating a run stops every process
of its training (torchrun, both ranks, their DataLoader workers) and ends it CANCELED; and with the instance's pools
limited to one slot, a second training_run waits until the first has ended (one training per machine)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import services
from packed_fixtures import SMALL_PARAMS, make_manifest, small_fixture

from bagel_core.config.processes import pid_alive

ROOT = Path(__file__).resolve().parents[1]
IMMEDIATE = """
run_coordinator:   # launch at once, no daemon needed (the queued coordinator waits for dagster-daemon)
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""
ONE_GPU = """
concurrency:       # what `bagel example` and pipelines/dagster.postgres.yaml set: one slot per pool (gpu)
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""
BUDGETS = ("expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample", "prefer_buffer_before",
           "max_buffer_size")  # fmt: skip
RUN_CONFIG = {
    "ops": {"training_run": {"config": {"total_steps": 100_000, "save_every": 100_000}}},
    "resources": {
        "launch": {"config": {"nproc_per_node": 2, "num_workers": 1, **{k: getattr(SMALL_PARAMS, k) for k in BUDGETS}}},
        "launcher": {"config": {"termination_grace_s": 10}},
    },
}


def _processes_mentioning(text: str) -> list[int]:
    """Every live process whose command line contains ``text`` (torchrun, ranks and workers all carry the
    workspace path in their arguments)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid() and pid_alive(pid)]


def _workspace(tmp_path: Path, dagster_yaml: str) -> tuple[Path, Path, dict[str, str]]:
    fx = small_fixture(tmp_path / "data", t2i_files=2)
    ws = tmp_path / "ws"
    (ws / "registry").mkdir(parents=True)
    shutil.copy(fx.registry, ws / "registry" / "dataset_info.yaml")
    shutil.copy(fx.groups, ws / "registry" / "example.yaml")
    make_manifest(fx, ws / "manifest", world_size=2, num_workers=1)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(dagster_yaml)
    return ws, home, {**os.environ, "BAGEL_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}


def _wait_for_training(url: str, run_id: str, logs: list[Path], log: Path) -> Path:
    """The torchrun.log of ``run_id``'s training once it has logged a step (``logs``: those seen before)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        fresh = [p for p in log.parent.glob("ws/runs/*/torchrun.log") if p not in logs]
        if fresh and "Train Loss" in fresh[0].read_text(errors="replace"):
            return fresh[0]
        assert services.run_status(url, run_id) not in ("FAILURE", "CANCELED"), log.read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail(f"training of {run_id} did not start:\n{log.read_text()[-3000:]}")


def test_terminating_the_run_stops_every_training_process(tmp_path):
    ws, home, env = _workspace(tmp_path, IMMEDIATE)
    log = tmp_path / "webserver.log"
    with services.dagster_ui(home, env, log, ROOT) as url:
        run_id = services.launch_asset_run(url, ["training_run"], RUN_CONFIG)
        _wait_for_training(url, run_id, [], log)
        training = _processes_mentioning(str(ws / "registry"))
        assert len(training) >= 5, training  # torchrun, 2 ranks, a DataLoader worker each

        services.terminate_run(url, run_id)
        assert services.wait_for_status(url, run_id, ("CANCELED", "FAILURE"), timeout=90) == "CANCELED"
        assert [pid for pid in training if pid_alive(pid)] == []
        assert _processes_mentioning(str(ws / "registry")) == []
        assert any("stopped torchrun" in m for m in services.run_messages(url, run_id))


def test_the_gpu_pool_keeps_a_second_training_waiting_until_the_first_ends(tmp_path):
    ws, home, env = _workspace(tmp_path, ONE_GPU)
    log = tmp_path / "dagster-dev.log"
    with services.dagster_ui(home, env, log, ROOT, with_daemon=True) as url:
        first = services.launch_asset_run(url, ["training_run"], RUN_CONFIG)
        first_log = _wait_for_training(url, first, [], log)
        second = services.launch_asset_run(url, ["training_run"], RUN_CONFIG)
        time.sleep(10)  # the daemon has had several ticks to start it, if the pool let it
        assert services.run_status(url, first) == "STARTED"
        assert [p for p in ws.glob("runs/*/torchrun.log") if p != first_log] == []  # no second training started
        assert services.run_status(url, second) in ("QUEUED", "STARTING", "STARTED")

        services.terminate_run(url, first)  # the slot frees: the second training starts
        assert services.wait_for_status(url, first, ("CANCELED", "FAILURE"), timeout=90) == "CANCELED"
        _wait_for_training(url, second, [first_log], log)
        services.terminate_run(url, second)
        assert services.wait_for_status(url, second, ("CANCELED", "FAILURE"), timeout=90) == "CANCELED"
    assert _processes_mentioning(str(ws / "registry")) == []
