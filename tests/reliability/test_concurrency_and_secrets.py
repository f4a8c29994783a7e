"""Two people at once, and secrets: two index runs of the same data at the same moment leave one valid index; a
W&B key and a Hugging Face token planted in the environment of a whole training (through Dagster) appear in no file
the run wrote: Dagster's event log, logs, metrics, checkpoints, export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
from packed_fixtures import SMALL_PARAMS, small_fixture

from assets.k8s_launcher import K8sTorchrunLauncher
from assets.launcher import LocalTorchrunLauncher
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import sampling_manifest
from assets.training import checkpoint, model_export, training_run

BAGEL = str(Path(sys.executable).parent / "bagel")


def test_two_index_runs_of_the_same_data_at_once_leave_one_valid_index(tmp_path, fault):
    fx = small_fixture(tmp_path / "data", t2i_files=3)
    registry = tmp_path / "reg" / "dataset_info.yaml"
    registry.parent.mkdir()
    shutil.copy(fx.registry, registry)
    out = tmp_path / "index"
    command = [BAGEL, "data", "index", "--registry", str(registry), "--out", str(out), "--workers", "1",
               "--no-progress", "--force"]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 1]), results  # both finish, or one stops cleanly
    assert all("Traceback" not in err for _, _, err in results), results
    index = pl.read_parquet(out / "index.parquet")
    key = ["dataset", "source_file", "row_group", "row_index"]
    assert index.height > 0 and index.select(key).is_unique().all()  # no duplicated or torn rows
    solo = tmp_path / "solo"
    subprocess.run([*command[:6], str(solo), *command[7:]], check=True, capture_output=True)
    assert index.sort(key).select([*key, "status"]).equals(pl.read_parquet(solo / "index.parquet").sort(key)
                                                           .select([*key, "status"]))  # fmt: skip
    fault("two `bagel data index` runs of the same registry started at the same moment",
          f"exit codes {codes}, no traceback; the index has unique sample keys and equals a solo run's")  # fmt: skip


CANARIES = {"WANDB_API_KEY": "wandbcanary0123456789abcdef0123456789abcd", "HF_TOKEN": "hf_canaryTOKEN0123456789"}


def test_secrets_in_the_environment_never_reach_any_file_the_run_wrote(tmp_path, monkeypatch, fault):
    fx = small_fixture(tmp_path / "data", t2i_files=2)
    ws = PipelineWorkspace(root=str(tmp_path / "ws"))
    ws.registry_path.parent.mkdir(parents=True)
    shutil.copy(fx.registry, ws.registry_path)
    shutil.copy(fx.groups, ws.dataset_config_path)
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B really runs (offline) with the key in its environment
    launch = TrainingLaunch(nproc_per_node=2, num_workers=0, **{k: getattr(SMALL_PARAMS, k) for k in (
        "expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample", "prefer_buffer_before",
        "max_buffer_size")})  # fmt: skip
    resources = {"workspace": ws, "launch": launch, "launcher": LocalTorchrunLauncher(termination_grace_s=10),
                 "k8s_launcher": K8sTorchrunLauncher()}  # fmt: skip
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        train = {"total_steps": 2, "save_every": 1, "extra_args": ["--text_cond_dropout_prob", "0"]}
        result = dg.materialize(
            [sampling_manifest, training_run, model_export, checkpoint],
            instance=instance,
            resources=resources,
            run_config={
                "ops": {"sampling_manifest": {"config": {"simulate": False}}, "training_run": {"config": train}}
            },
            selection=[sampling_manifest, training_run, model_export],
            raise_on_error=False,
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert list(ws.runs_dir.rglob("*.wandb"))  # W&B wrote its offline run
        events = "\n".join(str(e) for e in instance.all_logs(result.run_id))
    written = [p for root in (ws.root_path, home) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20
    leaks = [(p, name) for p in written for name, value in CANARIES.items() if value.encode() in p.read_bytes()]
    assert leaks == [] and not [n for n, v in CANARIES.items() if v in events]
    assert os.environ["WANDB_API_KEY"] == CANARIES["WANDB_API_KEY"]  # the key was really there all along
    fault("a W&B key and an HF token in the environment of a Dagster training run (W&B offline)",
          f"neither appears in any of the {len(written)} files written (workspace, checkpoints, export, metrics, "
          "W&B run, Dagster's SQLite event log) nor in the run's events")  # fmt: skip
