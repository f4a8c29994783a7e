"""The production instance (pipelines/dagster.postgres.yaml) against a real PostgreSQL server, and the UI on it.

One module-scoped set-up: a throwaway PostgreSQL cluster, ``$DAGSTER_HOME/dagster.yaml`` loaded from the
documented file, and ``dagster job execute ... bagel_example_job`` (small example, 2-step training) on it.
Then: the run and its materialisations are in PostgreSQL (Dagster's API and plain SQL); dagster-webserver on
the same instance answers GraphQL for every asset and the checkpoint partitions; headless Chromium takes
screenshots of the lineage graph and the asset pages (``test-artifacts/`` or ``$BAGEL_TEST_ARTIFACTS``).

Without PostgreSQL or Chromium the tests skip, unless BAGEL_REQUIRE_SERVICES=1 (set by .ci/run), where a
missing service fails them: CI never skips silently. ``.ci/services`` installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import services
import yaml
from test_pipeline_assets import JOB_RUN_CONFIG

from pipelines import defs

REPO = Path(__file__).resolve().parents[1]
INSTANCE_YAML = REPO / "pipelines" / "dagster.postgres.yaml"
JOB = "bagel_example_job"
CHECKPOINT = "checkpoint"
CHECKPOINT_PARTITIONS = "bagel_checkpoints"

# the job run (about 2 minutes on 2 cores) happens in the first test's set-up
pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


def _unavailable(reason: str):
    if services.services_required():
        pytest.fail(f"{reason} ({services.REQUIRE_ENV}=1: a missing service is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _asset_keys() -> set[str]:
    """Every asset of the code location."""
    return {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def _job_asset_keys() -> set[str]:
    """The assets bagel_example_job materialises (the checkpoint partitions are recorded by training_run's step;
    per-checkpoint assets such as a checkpoint evaluation belong to other jobs)."""
    return {key.to_user_string() for key in defs.resolve_job_def(JOB).asset_layer.executable_asset_keys}


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = round(time.monotonic() - started, 1)


@dataclass
class Production:
    pg: services.PostgresServer
    home: Path
    workspace: Path
    env: dict[str, str]
    job_output: str
    timings: dict[str, float]


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    reason = services.postgres_unavailable_reason()
    if reason:
        _unavailable(reason)
    timings: dict[str, float] = {}
    started = time.monotonic()
    pg = services.PostgresServer.start()
    _timed(timings, "postgres_start_s", started)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in pg.env().items():  # for DagsterInstance.from_config in this process too
                mp.setenv(name, value)
            tmp = tmp_path_factory.mktemp("production")
            home, workspace = tmp / "dagster_home", tmp / "ws"
            home.mkdir()
            # the documented file itself, byte for byte (comments included)
            shutil.copyfile(INSTANCE_YAML, home / "dagster.yaml")
            run_config = tmp / "run.yaml"
            run_config.write_text(yaml.safe_dump(JOB_RUN_CONFIG))
            env = dict(
                os.environ,
                DAGSTER_HOME=str(home),
                BAGEL_WORKSPACE=str(workspace),
                HF_HUB_OFFLINE="1",
                WANDB_MODE="disabled",
            )
            dagster = Path(sys.executable).parent / "dagster"
            command = [str(dagster), "job", "execute", "-m", "pipelines", "-j", JOB, "-c", str(run_config)]
            started = time.monotonic()
            proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=540, check=False)
            _timed(timings, "job_execute_s", started)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{output[-6000:]}"
            yield Production(pg, home, workspace, env, output, timings)
    finally:
        started = time.monotonic()
        pg.stop()
        _timed(timings, "postgres_stop_s", started)
        print(f"\nproduction instance timings: {json.dumps(timings)}")


def test_documented_instance_yaml_keeps_secrets_in_env_and_the_bagel_settings(tmp_path, monkeypatch):
    from bagel_core.cli import dagster_home_for

    config = yaml.safe_load(INSTANCE_YAML.read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    env_names = {
        "username": "DAGSTER_PG_USERNAME",
        "password": "DAGSTER_PG_PASSWORD",
        "hostname": "DAGSTER_PG_HOST",
        "db_name": "DAGSTER_PG_DB",
        "port": "DAGSTER_PG_PORT",
    }
    assert {field: db[field] for field in env_names} == {field: {"env": name} for field, name in env_names.items()}
    assert set(db) - set(env_names) == {"scheme"}  # nothing else, no literal secret
    # the same concurrency and telemetry settings as the dagster.yaml `bagel example` writes
    monkeypatch.delenv("DAGSTER_HOME")
    example = yaml.safe_load((dagster_home_for(tmp_path) / "dagster.yaml").read_text())
    assert config["concurrency"] == example["concurrency"] and config["concurrency"]["pools"]["default_limit"] == 1
    assert config["telemetry"] == example["telemetry"] == {"enabled": False}
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 0
    assert monitoring["max_runtime_seconds"] >= 24 * 3600  # multi-hour training is not cut short


def test_run_and_materialisations_are_stored_in_postgres(production):
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    assert "RUN_SUCCESS" in production.job_output
    instance = DagsterInstance.from_config(str(production.home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        [run] = instance.get_runs(filters=RunsFilter(job_name=JOB))
        assert run.status == DagsterRunStatus.SUCCESS
        for key in _job_asset_keys():
            event = instance.get_latest_materialization_event(AssetKey.from_user_string(key))
            assert event is not None and event.run_id == run.run_id, key
        partitions = instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS)
        assert len(partitions) == JOB_RUN_CONFIG["ops"]["training_run"]["config"]["total_steps"]  # save_every 1
        assert instance.get_materialized_partitions(AssetKey(CHECKPOINT)) == set(partitions)
    finally:
        instance.dispose()

    with production.pg.connect() as conn, conn.cursor() as cur:  # the password user, over TCP
        cur.execute("SELECT status, pipeline_name FROM runs WHERE run_id = %s", (run.run_id,))
        assert cur.fetchall() == [("SUCCESS", JOB)]
        cur.execute(
            "SELECT asset_key, count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = "
            "'ASSET_MATERIALIZATION' GROUP BY asset_key",
            (run.run_id,),
        )
        per_asset = {AssetKey.from_db_string(k).to_user_string(): n for k, n in cur.fetchall()}
        assert set(per_asset) == _job_asset_keys() | {CHECKPOINT}
        assert per_asset[CHECKPOINT] == len(partitions)
        cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s", (CHECKPOINT_PARTITIONS,))
        assert {p for (p,) in cur.fetchall()} == set(partitions)
    conn.close()


@pytest.fixture(scope="module")
def webserver(production, tmp_path_factory):
    """dagster-webserver (no daemon) on the production instance; its base URL once the code location loaded."""
    log = tmp_path_factory.mktemp("webserver") / "webserver.log"
    port = services.free_port()
    command = [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "pipelines", "-h", "127.0.0.1"]
    started = time.monotonic()
    proc = services.start_process_group([*command, "-p", str(port)], production.env, log, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        info = services.wait_for_webserver(base, proc, log)
        assert info["dagster_version"] == info["dagster_webserver_version"] == "1.13.27"
        _timed(production.timings, "webserver_ready_s", started)
        yield base
    finally:
        services.stop_process_group(proc)


ASSETS_QUERY = """
query {
  assetNodes { assetKey { path } isPartitioned }
  assetsOrError {
    __typename
    ... on AssetConnection { nodes { key { path } assetMaterializations(limit: 1) { runId partition } } }
  }
}
"""

CHECKPOINT_QUERY = """
query ($partition: String!) {
  assetNodeOrError(assetKey: {path: ["checkpoint"]}) {
    __typename
    ... on AssetNode {
      partitionKeys
      partitionDefinition { type name }
      assetPartitionStatuses { __typename ... on DefaultPartitionStatuses { materializedPartitions } }
    }
  }
  assetOrError(assetKey: {path: ["checkpoint"]}) {
    __typename
    ... on Asset { assetMaterializations(partitions: [$partition]) { runId partition } }
  }
}
"""


def test_webserver_graphql_shows_every_asset_and_the_latest_checkpoint(production, webserver):
    data = services.graphql(webserver, ASSETS_QUERY)
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == _asset_keys()
    assert data["assetsOrError"]["__typename"] == "AssetConnection"
    latest = {"/".join(a["key"]["path"]): a["assetMaterializations"] for a in data["assetsOrError"]["nodes"]}
    missing = sorted(k for k in _job_asset_keys() if not latest.get(k))
    assert not missing, f"no materialisation in the UI for {missing}"

    run_id, latest_partition = _latest(production)
    data = services.graphql(webserver, CHECKPOINT_QUERY, {"partition": latest_partition})
    node = data["assetNodeOrError"]
    assert node["__typename"] == "AssetNode"
    assert node["partitionDefinition"] == {"type": "DYNAMIC", "name": CHECKPOINT_PARTITIONS}
    assert latest_partition in node["partitionKeys"]
    assert latest_partition in node["assetPartitionStatuses"]["materializedPartitions"]
    events = data["assetOrError"]["assetMaterializations"]
    assert [(e["partition"], e["runId"]) for e in events] == [(latest_partition, run_id)]


def _artifacts_dir() -> Path:
    return Path(os.environ.get("BAGEL_TEST_ARTIFACTS") or REPO / "test-artifacts")


def _assert_png_not_blank(png: Path) -> None:
    from PIL import Image

    assert png.is_file(), f"no screenshot at {png}"
    assert png.stat().st_size > 10_000, f"{png} is only {png.stat().st_size} bytes"
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{png} looks blank: {len(colours or [])} colours"


def _latest(production: Production) -> tuple[str, str]:
    """(run id, latest checkpoint partition) of the job run, from the instance."""
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(production.home))
    try:
        [run] = instance.get_runs()
        return run.run_id, instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS)[-1]  # the last one added
    finally:
        instance.dispose()


@pytest.fixture(scope="module")
def chromium() -> str:
    """Checked before the (module-scoped) job run and webserver that the screenshot test also needs."""
    path = services.chromium_path()
    if path is None:
        _unavailable("chromium not found (headless screenshots of the Dagster UI); run .ci/services")
    return path


def test_ui_screenshots_show_the_lineage_graph_and_asset_pages(chromium, production, webserver, tmp_path):
    out = _artifacts_dir()
    run_id, latest_partition = _latest(production)
    materialised = _job_asset_keys() | {CHECKPOINT}
    groups = sorted({node.group_name for node in defs.resolve_asset_graph().asset_nodes})
    # the global lineage page ("Lineage" in the nav) opens with every group collapsed; ?expanded= with group ids
    # "global@global:<group>" opens them, as the graph toolbar's "expand all groups" does
    expanded = urllib.parse.quote(",".join(f"global@global:{g}" for g in groups))

    def lineage_ready(dom: str) -> bool:
        colours = services.lineage_node_colours(dom)
        return set(colours) == _asset_keys() and all(colours[k] == "green" for k in materialised)

    pages = {  # screenshot -> (path, what the rendered page must show)
        "dagster-asset-lineage.png": (f"/asset-groups?expanded={expanded}", lineage_ready),
        # the latest materialisation links to its run
        "dagster-training_run.png": ("/assets/training_run", lambda dom: f"/runs/{run_id}" in dom),
        # latest materialisation: the newest checkpoint partition
        "dagster-checkpoint.png": ("/assets/checkpoint", lambda dom: latest_partition in dom),
    }
    for name, (path, ready) in pages.items():
        started = time.monotonic()
        result, tries = services.screenshot_when(webserver + path, out / name, tmp_path / f"profile-{name}", ready)
        _timed(production.timings, f"screenshot_{name}_s", started)
        production.timings[f"screenshot_{name}_tries"] = tries
        assert result.returncode == 0, result.stderr[-3000:]
        _assert_png_not_blank(out / name)
        assert ready(result.stdout), (
            f"{name}: the page at {path} never showed what it should ({tries} tries); node colours "
            f"{services.lineage_node_colours(result.stdout)}; DOM tail:\n{result.stdout[-2000:]}"
        )
