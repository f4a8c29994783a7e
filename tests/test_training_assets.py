"""Dagster training assets: training_run launches torchrun (2 CPU processes), records each saved step as a
checkpoint partition, model_export and inference_smoke follow; a failing rank's message fails the asset; a
manifest planned for another world size stops training; stopping the launcher leaves no process behind."""

from __future__ import annotations

import json
import shutil
import time

import dagster as dg
import pytest
from packed_fixtures import SMALL_PARAMS, make_manifest, small_fixture

from assets.k8s_launcher import K8sTorchrunLauncher
from assets.launcher import LocalTorchrunLauncher, descendants
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import manifest_matches_launch, sampling_manifest
from assets.training import (
    CHECKPOINTS,
    checkpoint,
    checkpoint_smoke,
    inference_smoke,
    model_export,
    training_args,
    training_run,
)
from assets.vae_latents import vae_latents
from bagel_core.config.processes import pid_alive
from pipelines import defs
from pipelines.automation import new_checkpoint_sensor

LAUNCH = TrainingLaunch(
    nproc_per_node=2,
    num_workers=0,
    expected_num_tokens=SMALL_PARAMS.expected_num_tokens,
    max_num_tokens=SMALL_PARAMS.max_num_tokens,
    max_num_tokens_per_sample=SMALL_PARAMS.max_num_tokens_per_sample,
    prefer_buffer_before=SMALL_PARAMS.prefer_buffer_before,
    max_buffer_size=SMALL_PARAMS.max_buffer_size,
)
TRAIN = {"total_steps": 2, "save_every": 1, "extra_args": ["--text_cond_dropout_prob", "0"]}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("training_assets") / "data", t2i_files=2)


def _workspace(fx, tmp_path) -> PipelineWorkspace:
    ws = PipelineWorkspace(root=str(tmp_path / "ws"))
    ws.registry_path.parent.mkdir(parents=True)
    shutil.copy(fx.registry, ws.registry_path)
    shutil.copy(fx.groups, ws.dataset_config_path)
    return ws


def _materialize(ws, selection, launch=LAUNCH, train=TRAIN, instance=None):
    resources = {
        "workspace": ws,
        "launch": launch,
        "launcher": LocalTorchrunLauncher(termination_grace_s=10),
        "k8s_launcher": K8sTorchrunLauncher(),
    }
    config = {"ops": {"training_run": {"config": train}}} if training_run in selection else None
    if vae_latents in selection:  # planned for this training: its steps, and its extra_args (they change dropout)
        planned = {"steps": train["total_steps"], "extra_args": train["extra_args"]}
        config = {"ops": {**(config or {}).get("ops", {}), "vae_latents": {"config": planned}}}
    runnable = [a for a in selection if a is not checkpoint]
    return dg.materialize(
        selection, instance=instance, resources=resources, run_config=config, raise_on_error=False, selection=runnable
    )


def _plan(ws, instance, launch=LAUNCH):
    ws.manifest_dir.mkdir(parents=True, exist_ok=True)
    result = dg.materialize(
        [sampling_manifest, manifest_matches_launch],
        instance=instance,
        resources={"workspace": ws, "launch": launch},
        run_config={"ops": {"sampling_manifest": {"config": {"simulate": False}}}},
    )
    assert result.success


def test_training_records_checkpoints_then_export_and_smoke(fx, tmp_path):
    ws = _workspace(fx, tmp_path)
    shutil.copytree(fx.index_dir, ws.index_dir)
    with dg.instance_for_test() as instance:
        _plan(ws, instance)
        selection = [vae_latents, training_run, model_export, inference_smoke, checkpoint]
        result = _materialize(ws, selection, instance=instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        run = result.run_id[:8]
        latents = result.asset_materializations_for_node("vae_latents")[0].metadata
        assert latents["images_encoded"].value > 0 and latents["shards_encoded"].value > 0
        assert latents["scope"].value == "planned" and latents["planned_samples"].value > 0
        assert latents["replay_seconds"].value > 0
        # the training sampled all its latents from that cache (same VAE: training_run's preset and global_seed;
        # the samples its 2 steps on 2 ranks read, replayed by vae_latents)
        trained = result.asset_materializations_for_node("training_run")[-1].metadata
        assert trained["vae_images_from_cache"].value > 0 and trained["vae_images_encoded_live"].value == 0
        assert instance.get_dynamic_partitions(CHECKPOINTS.name) == [f"{run}-step00000001", f"{run}-step00000002"]
        recorded = instance.fetch_materializations(dg.AssetKey("checkpoint"), limit=10).records
        assert sorted(r.asset_materialization.partition for r in recorded) == [
            f"{run}-step00000001",
            f"{run}-step00000002",
        ]
        [check] = [
            e for e in result.get_asset_check_evaluations() if e.check_name == "checkpoints_load_and_losses_finite"
        ]
        assert check.passed and check.metadata["checkpoints"].value == 2
        meta = result.asset_materializations_for_node("training_run")[-1].metadata
        assert meta["steps"].value == 2 and meta["checkpoints"].value == 2
        assert meta["checkpoints_reported_by_rank0"].value == 2  # through Pipes, not only found on disk
        assert "data:image/png;base64," in meta["loss_curve"].value
        export = result.asset_materializations_for_node("model_export")[0].metadata
        assert export["keys"].value > 100 and export["step"].value == 2
        smoke = result.asset_materializations_for_node("inference_smoke")[0].metadata
        assert "data:image/png;base64," in smoke["image"].value and isinstance(smoke["answer"].value, str)

        # new_checkpoint_sensor: one run request per checkpoint recorded after its cursor, none when nothing is new
        first = dg.build_sensor_context(instance=instance, definitions=defs)
        assert isinstance(new_checkpoint_sensor(first), dg.SkipReason)  # first tick: starts from now
        requests = new_checkpoint_sensor(dg.build_sensor_context(instance=instance, cursor="0", definitions=defs))
        keys = [f"{run}-step00000001", f"{run}-step00000002"]
        assert [(r.partition_key, r.run_key) for r in requests] == [(k, k) for k in keys]
        again = dg.build_sensor_context(instance=instance, cursor=first.cursor, definitions=defs)
        assert isinstance(new_checkpoint_sensor(again), dg.SkipReason)
        # ... and the asset it requests evaluates that checkpoint
        evaluated = dg.materialize(
            [checkpoint_smoke, checkpoint], instance=instance, partition_key=keys[0], selection=[checkpoint_smoke]
        )
        assert evaluated.success
        meta = evaluated.asset_materializations_for_node("checkpoint_smoke")[0].metadata
        assert "data:image/png;base64," in meta["image"].value and meta["checkpoint"].value.endswith("step_1")
        assert [p.name for p in (ws.runs_dir / run / "checkpoints").iterdir() if p.name.startswith("smoke-")] == []


def test_preflight_stops_a_launch_that_cannot_work_before_any_process_starts(fx, tmp_path):
    ws = _workspace(fx, tmp_path)
    with dg.instance_for_test() as instance:
        _plan(ws, instance)
        result = _materialize(
            ws, [training_run], train={**TRAIN, "extra_args": ["--max_latent_size", "2"]}, instance=instance
        )
    assert not result.success
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "launch_preflight"]
    assert not check.passed and "max_latent_size 2" in check.metadata["problem"].value
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "launch_preflight failed" in failure.message or "max_latent_size 2" in str(failure.step_failure_data)
    assert not list(ws.runs_dir.rglob("torchrun.log"))  # nothing was launched


def test_a_failing_rank_fails_the_asset_with_its_message(fx, tmp_path):
    """An absurd learning rate passes every start-up check, then the weights overflow and the ranks raise."""
    ws = _workspace(fx, tmp_path)
    with dg.instance_for_test() as instance:
        _plan(ws, instance)
        result = _materialize(ws, [training_run], train={**TRAIN, "lr": 1e38, "warmup_steps": 0}, instance=instance)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = failure.step_failure_data.user_failure_data.description
    assert "torchrun exit" in text and "[rank0]: RuntimeError: value cannot be converted" in text, text


def test_a_manifest_for_another_world_size_stops_training(fx, tmp_path):
    ws = _workspace(fx, tmp_path)
    with dg.instance_for_test() as instance:
        _plan(ws, instance, TrainingLaunch(nproc_per_node=1, num_workers=0))
        result = _materialize(ws, [training_run], instance=instance)
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "does not match the launch configuration" in failure.message or "world_size=1" in str(
            failure.step_failure_data.user_failure_data.metadata
        )
    # the blocking check on the manifest says the same against this launch configuration
    evaluation = manifest_matches_launch(workspace=ws, launch=LAUNCH)
    assert not evaluation.passed and "world_size=1" in str(evaluation.metadata["problems"].value)
    assert not (ws.runs_dir).exists() or not any(ws.runs_dir.iterdir())


def test_stopping_leaves_no_process_behind(fx, tmp_path):
    manifest = make_manifest(fx, tmp_path / "manifest", world_size=2, num_workers=1)
    ws = _workspace(fx, tmp_path)
    launch = TrainingLaunch(nproc_per_node=2, num_workers=1, **{k: getattr(LAUNCH, k) for k in (
        "expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample", "prefer_buffer_before",
        "max_buffer_size")})  # fmt: skip
    ws.manifest_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(manifest, ws.manifest_dir)
    launcher = LocalTorchrunLauncher(termination_grace_s=5)
    args = training_args(training_run_config(total_steps=10_000), launch, ws, tmp_path / "run")
    log = tmp_path / "run" / "torchrun.log"
    job = launcher.start(launcher.commands(1, 2, args), log)
    [proc] = job.agents
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Train Loss" not in (log.read_text() if log.is_file() else ""):
        time.sleep(0.2)
    tree = [proc.pid, *descendants(proc.pid)]
    assert len(tree) >= 5, tree  # torchrun, 2 ranks, their DataLoader workers
    launcher.stop(job)
    time.sleep(0.5)
    assert [pid for pid in tree if pid_alive(pid)] == []


def training_run_config(**over):
    from assets.training import TrainingRunConfig

    return TrainingRunConfig(**{**TRAIN, **over})


def test_two_node_loopback_launch_trains_and_checkpoints(fx, tmp_path):
    """``nnodes`` 2 x 1 process: two torchrun agents on 127.0.0.1 meet through a c10d rendezvous."""
    ws = _workspace(fx, tmp_path)
    two_nodes = TrainingLaunch(**{**LAUNCH.model_dump(), "nnodes": 2, "nproc_per_node": 1})
    with dg.instance_for_test() as instance:
        _plan(ws, instance, two_nodes)
        result = _materialize(ws, [training_run, checkpoint], launch=two_nodes, instance=instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert len(instance.get_dynamic_partitions(CHECKPOINTS.name)) == 2
    [run] = [p for p in ws.runs_dir.iterdir() if p.is_dir()]
    state = json.loads((run / "checkpoints" / "step_2" / "train_state.json").read_text())
    assert state["world_size"] == 2 and sorted(p.name for p in (run / "checkpoints" / "step_2" / "rng").iterdir()) == [
        "rank_00000.pt", "rank_00001.pt"]  # fmt: skip


def test_checkpoint_check_fails_on_a_broken_step_or_a_non_finite_loss(tmp_path):
    from assets.training import checkpoints_check

    (tmp_path / "step_1").mkdir()  # no marker, no DCP metadata
    result = checkpoints_check(tmp_path, [1], {1: {"loss": 1.0, "ce": 1.0, "mse": 0.5}})
    assert not result.passed and "step 1:" in str(result.metadata["problems"].value)
    nan = checkpoints_check(tmp_path, [], {3: {"loss": float("nan"), "ce": 1.0, "mse": 0.5}})
    problems = str(nan.metadata["problems"].value)
    assert not nan.passed and "non-finite losses at steps [3]" in problems and "no checkpoint was saved" in problems


def test_retraining_can_start_from_the_latest_export(fx, tmp_path):
    ws = _workspace(fx, tmp_path)
    base = training_args(training_run_config(start_from="latest_export"), LAUNCH, ws, tmp_path / "run")
    assert "--model_preset" in base and "--model_path" not in base  # nothing exported yet: the base model
    final = ws.runs_dir / "abc" / "checkpoints" / "step_final"
    final.mkdir(parents=True)
    (ws.runs_dir / "latest.json").write_text(json.dumps({"run_dir": str(ws.runs_dir / "abc")}))
    args = training_args(training_run_config(start_from="latest_export"), LAUNCH, ws, tmp_path / "run")
    assert args[args.index("--model_path") + 1] == str(final)
    assert "--model_path" not in training_args(training_run_config(), LAUNCH, ws, tmp_path / "run")
    with pytest.raises(dg.Failure, match="start_from"):
        training_args(training_run_config(start_from="yesterday"), LAUNCH, ws, tmp_path / "run")
