"""Cancelling a training from Dagster, the way the UI does it: the run is launched through the webserver's GraphQL
API and terminated with ``terminateRun``; afterwards no process of the training is left (torchrun, both ranks and
their DataLoader workers), and the run ends CANCELED."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import services
from packed_fixtures import SMALL_PARAMS, make_manifest, small_fixture

from bagel_core.config.processes import pid_alive

ROOT = Path(__file__).resolve().parents[1]
DAGSTER_YAML = """
run_coordinator:   # launch at once, no daemon needed (the queued coordinator waits for dagster-daemon)
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""


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


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
TERMINATE = """mutation($id: String!) { terminateRun(runId: $id) { __typename ... on PythonError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
LOGS = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { __typename
  ... on MessageEvent { message } } } } }"""


def test_terminating_the_run_stops_every_training_process(tmp_path):
    fx = small_fixture(tmp_path / "data", t2i_files=2)
    ws = tmp_path / "ws"
    (ws / "registry").mkdir(parents=True)
    shutil.copy(fx.registry, ws / "registry" / "dataset_info.yaml")
    shutil.copy(fx.groups, ws / "registry" / "example.yaml")
    make_manifest(fx, ws / "manifest", world_size=2, num_workers=1)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    port = services.free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BAGEL_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "webserver.log"
    server = services.start_process_group(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "pipelines", "-h", "127.0.0.1", "-p", str(port)],
        env,
        log,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        services.wait_for_webserver(url, server, log)

        def status(run_id: str) -> str:
            return services.graphql(url, STATUS, {"id": run_id})["runOrError"]["status"]

        budgets = {k: getattr(SMALL_PARAMS, k) for k in (
            "expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample", "prefer_buffer_before",
            "max_buffer_size")}  # fmt: skip
        run_config = {
            "ops": {"training_run": {"config": {"total_steps": 100_000, "save_every": 100_000}}},
            "resources": {
                "launch": {"config": {"nproc_per_node": 2, "num_workers": 1, **budgets}},
                "launcher": {"config": {"termination_grace_s": 10}},
            },
        }
        selector = {
            "repositoryLocationName": "pipelines",
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": ["training_run"]}],
        }
        params = {"selector": selector, "runConfigData": run_config, "mode": "default"}
        launched = services.graphql(url, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.monotonic() + 240
        torchrun_log = None
        while time.monotonic() < deadline:
            torchrun_log = next(ws.glob("runs/*/torchrun.log"), None)
            if torchrun_log is not None and "Train Loss" in torchrun_log.read_text(errors="replace"):
                break
            assert status(run_id) not in ("FAILURE", "CANCELED"), log.read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail(f"training did not start: {torchrun_log and torchrun_log.read_text()[-2000:]}")
        training = _processes_mentioning(str(ws / "registry"))
        assert len(training) >= 5, training  # torchrun, 2 ranks, a DataLoader worker each

        terminated = services.graphql(url, TERMINATE, {"id": run_id})["terminateRun"]
        assert terminated["__typename"] == "TerminateRunSuccess", terminated
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and status(run_id) not in ("CANCELED", "FAILURE"):
            time.sleep(0.5)
        assert status(run_id) == "CANCELED"
        assert [pid for pid in training if pid_alive(pid)] == []
        assert _processes_mentioning(str(ws / "registry")) == []
        events = services.graphql(url, LOGS, {"id": run_id})["logsForRun"]["events"]
        assert any("stopped torchrun" in (e.get("message") or "") for e in events), json.dumps(events)[-3000:]
    finally:
        services.stop_process_group(server)
