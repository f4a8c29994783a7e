"""Dagster: definitions load, the example assets materialise, and a broken registry blocks."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets.example import dataset_registry, example_dataset, example_zip
from assets.resources import PipelineWorkspace
from pipelines import defs

SMALL_RUN_CONFIG = {
    "ops": {"example_zip": {"config": {"t2i_files": 2, "t2i_rows_per_file": 3, "edit_files": 2, "vlm_lines": 6}}}
}
# the whole job: the same small example, and a 2-step training run; its images are encoded live (the latent
# cache's asset and the trainer's use of it are tested in test_training_assets on 64 px images: far cheaper on CPU)
JOB_RUN_CONFIG = {
    "ops": {
        **SMALL_RUN_CONFIG["ops"],
        "vae_latents": {"config": {"enabled": False}},
        "training_run": {"config": {"total_steps": 2, "save_every": 1}},
    }
}


def test_definitions_load_and_job_exists():
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("bagel_example_job")
    keys = {key.to_user_string() for key in job.asset_layer.asset_graph.get_all_asset_keys()}
    assert {"example_zip", "example_dataset", "dataset_registry"} <= keys


def test_example_assets_materialise(tmp_path):
    workspace = PipelineWorkspace(root=str(tmp_path / "ws"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [example_zip, example_dataset, dataset_registry],
            instance=instance,
            resources={"workspace": workspace},
            run_config=SMALL_RUN_CONFIG,
        )
        assert result.success
        meta = result.asset_materializations_for_node("example_dataset")[0].metadata
        assert meta["t2i/files"].value == 2 and meta["vlm/files"].value > 6
        registry_meta = result.asset_materializations_for_node("dataset_registry")[0].metadata
        assert registry_meta["datasets"].value == 3
        [check] = result.get_asset_check_evaluations()
        assert check.passed
        assert Path(workspace.registry_path).is_file() and Path(workspace.dataset_config_path).is_file()
        # Re-materialising is idempotent: the unchanged archive is not extracted again.
        again = dg.materialize(
            [example_zip, example_dataset],
            instance=instance,
            resources={"workspace": workspace},
            run_config=SMALL_RUN_CONFIG,
        )
        assert (
            again.asset_materializations_for_node("example_dataset")[0].metadata["unchanged_archive_skipped"].value
            is True
        )


def test_a_dataset_with_no_readable_shard_fails_the_blocking_registry_check(tmp_path):
    """One unreadable shard is only a warning (tests/reliability/test_data_faults.py); all of them is an error."""
    workspace = PipelineWorkspace(root=str(tmp_path / "ws"))
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [example_zip, example_dataset],
            instance=instance,
            resources={"workspace": workspace},
            run_config=SMALL_RUN_CONFIG,
        ).success
        for shard in (workspace.example_dir / "bagel_example" / "t2i").glob("*.parquet"):
            shard.write_bytes(shard.read_bytes()[:100])  # truncated: footer gone
        result = dg.materialize(
            [dataset_registry], instance=instance, resources={"workspace": workspace}, raise_on_error=False
        )
        assert not result.success
        [check] = result.get_asset_check_evaluations()
        assert not check.passed
        assert "cannot read the parquet footer" in str(check.metadata["errors"].value)


@pytest.mark.slow  # CI runs this same command, against PostgreSQL, in tests/test_production_instance.py
def test_job_execute_cli_runs_the_main_job(tmp_path):
    """README command 1 ends in this command; run it for real (SQLite instance in an empty DAGSTER_HOME)."""
    env = dict(os.environ, BAGEL_WORKSPACE=str(tmp_path / "ws"), DAGSTER_HOME=str(tmp_path / "home"))
    Path(env["DAGSTER_HOME"]).mkdir()
    config = tmp_path / "run.yaml"
    import yaml

    config.write_text(yaml.safe_dump(JOB_RUN_CONFIG))
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run(
        [str(dagster), "job", "execute", "-m", "pipelines", "-j", "bagel_example_job", "-c", str(config)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    assert (tmp_path / "ws" / "registry" / "dataset_info.yaml").is_file()
    # it trained (torchrun, 2 processes), recorded checkpoints, exported and ran the smoke inference
    [run] = [p for p in (tmp_path / "ws" / "runs").iterdir() if p.is_dir()]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2", "step_final"]
    assert "inference_smoke" in proc.stdout + proc.stderr


def test_data_change_sensor_requests_a_run_only_on_change(tmp_path):
    from pipelines.automation import dataset_change_sensor as registered_data_changed

    workspace = PipelineWorkspace(root=str(tmp_path / "ws"))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
        assert isinstance(registered_data_changed(ctx), dg.SkipReason)  # no registry yet
        assert dg.materialize(
            [example_zip, example_dataset, dataset_registry],
            instance=instance,
            resources={"workspace": workspace},
            run_config=SMALL_RUN_CONFIG,
        ).success
        first = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
        assert isinstance(registered_data_changed(first), dg.SkipReason) and first.cursor
        same = dg.build_sensor_context(instance=instance, cursor=first.cursor, resources={"workspace": workspace})
        assert "unchanged" in registered_data_changed(same).skip_message
        shard = workspace.example_dir / "bagel_example" / "t2i" / "chunk_1.parquet"
        shard.write_bytes(shard.read_bytes() + b"")
        os.utime(shard, ns=(1, 1))
        changed = dg.build_sensor_context(instance=instance, cursor=first.cursor, resources={"workspace": workspace})
        request = registered_data_changed(changed)
        assert isinstance(request, dg.RunRequest) and request.run_key == changed.cursor != first.cursor


def test_registry_adds_one_index_partition_per_dataset(tmp_path):
    workspace = PipelineWorkspace(root=str(tmp_path / "ws"))
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [example_zip, example_dataset, dataset_registry],
            instance=instance,
            resources={"workspace": workspace},
            run_config=SMALL_RUN_CONFIG,
        ).success
        assert instance.get_dynamic_partitions("bagel_datasets") == [
            "t2i_pretrain.t2i",
            "unified_edit.seedxedit_multi",
            "vlm_sft.llava_ov",
        ]


def _upstream_copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An example in another folder, registered the upstream way: ``data/dataset_info.py`` with
    ``your_data_path`` placeholders (also inside the editing parquet_info JSON) and ``example.yaml``."""
    from bagel_core.config.discover import default_dataset_config, discover_registry
    from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

    root = tmp_path / "elsewhere"
    example = write_example_dataset(root, ExampleConfig(t2i_files=2, t2i_rows_per_file=3, edit_files=2, vlm_lines=6))
    found = discover_registry(example, parquet_info_dir=tmp_path / "scratch")
    info: dict = {}
    for e in found.entries:
        entry = e.to_yaml_dict()
        if e.parquet_info_path is not None:  # upstream points at the example's own JSON
            entry["parquet_info_path"] = str(example / "editing" / "parquet_info" / f"{e.name}_nas.json")
        info.setdefault(e.group, {})[e.name] = {k: v.replace(str(root), "your_data_path") if isinstance(v, str) else v
                                                 for k, v in entry.items()}  # fmt: skip
    code = tmp_path / "upstream" / "data" / "dataset_info.py"
    code.parent.mkdir(parents=True)
    code.write_text(f"# upstream style\nDATASET_INFO = {info!r}\n")
    groups = tmp_path / "upstream" / "data" / "configs" / "example.yaml"
    default_dataset_config(found).save(groups)
    return code, groups, root


@pytest.mark.slow  # ~64 s: the whole train_job; the default suite runs the example job (Postgres) and training_run
def test_train_job_on_data_registered_from_an_upstream_dataset_info(tmp_path):
    """data_job registers an upstream dataset_info.py + example.yaml; train_job trains on exactly that."""
    import yaml

    code, groups, data_root = _upstream_copy(tmp_path)
    assert "your_data_path" in code.read_text()
    env = dict(os.environ, BAGEL_WORKSPACE=str(tmp_path / "ws"), DAGSTER_HOME=str(tmp_path / "home"))
    Path(env["DAGSTER_HOME"]).mkdir()
    source = {"source": "upstream", "path": str(code), "data_root": str(data_root), "dataset_config": str(groups)}
    in_process = {"config": {"in_process": {}}}  # one process for all steps: no per-step start-up cost
    configs = {
        "data_job": {"ops": {"dataset_registry": {"config": source}}, "execution": in_process},
        "train_job": {
            "ops": {"training_run": {"config": {"total_steps": 2, "save_every": 2}}},
            "execution": in_process,
        },
    }
    dagster = Path(sys.executable).parent / "dagster"
    for job, run_config in configs.items():
        path = tmp_path / f"{job}.yaml"
        path.write_text(yaml.safe_dump(run_config))
        command = [str(dagster), "job", "execute", "-m", "pipelines", "-j", job, "-c", str(path)]
        proc = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, job + proc.stdout[-3000:] + proc.stderr[-3000:]
    registry = yaml.safe_load((tmp_path / "ws" / "registry" / "dataset_info.yaml").read_text())
    assert registry["t2i_pretrain"]["t2i"]["data_dir"].startswith(str(data_root))
    assert not (tmp_path / "ws" / "example").exists()  # the built-in example was never fetched
    [run] = [p for p in (tmp_path / "ws" / "runs").iterdir() if p.is_dir()]
    assert (run / "checkpoints" / "step_2").is_dir() and (run / "checkpoints" / "step_final").is_dir()
