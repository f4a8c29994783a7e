"""Dagster wiring: token_stats and sampling_manifest materialise, their checks pass or block as they should."""

from __future__ import annotations

import shutil

import dagster as dg
import polars as pl
from stats_fixtures import write_fixture

from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import manifest_matches_launch, num_used_data_capacity, sampling_manifest
from assets.token_stats import position_table_fits, token_cap_violations, token_stats


def _workspace(tmp_path) -> PipelineWorkspace:
    fx = write_fixture(tmp_path / "data", t2i_files=3, edit_files=2, vlm_copies=3)
    ws = PipelineWorkspace(root=str(tmp_path / "ws"))
    ws.registry_path.parent.mkdir(parents=True)
    shutil.copy(fx.registry, ws.registry_path)
    shutil.copy(fx.groups, ws.dataset_config_path)
    ws.index_dir.mkdir(parents=True)
    shutil.copy(fx.index_dir / "index.parquet", ws.index_dir / "index.parquet")
    return ws


def _run(ws, run_config=None, launch: TrainingLaunch | None = None):
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [
                token_stats,
                sampling_manifest,
                token_cap_violations,
                position_table_fits,
                num_used_data_capacity,
                manifest_matches_launch,
            ],
            instance=instance,
            resources={"workspace": ws, "launch": launch or TrainingLaunch(nproc_per_node=1)},
            run_config=run_config,
            raise_on_error=False,
        )


def test_assets_materialise_with_checks(tmp_path):
    ws = _workspace(tmp_path)
    launch = TrainingLaunch(
        nproc_per_node=1,
        num_workers=2,
        expected_num_tokens=10240,
        max_num_tokens=11520,
        max_num_tokens_per_sample=10240,
    )
    res = _run(ws, {"ops": {"token_stats": {"config": {"max_num_tokens_per_sample": 9000}}}}, launch)
    assert res.success
    stats_meta = res.asset_materializations_for_node("token_stats")[0].metadata
    assert stats_meta["counted"].value == pl.read_parquet(ws.stats_dir / "token_stats.parquet").height
    assert stats_meta["over_cap"].value > 0  # 2-step edits at 1024x768 exceed 9000
    assert "data:image/png;base64," in stats_meta["histogram_total_tokens"].value
    manifest_meta = res.asset_materializations_for_node("sampling_manifest")[0].metadata
    assert manifest_meta["ok"].value is True and manifest_meta["packs_per_epoch"].value > 0
    checks = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert checks["token_cap_violations"].passed is False
    assert checks["token_cap_violations"].severity == dg.AssetCheckSeverity.WARN
    assert checks["position_table_fits"].passed and checks["num_used_data_capacity"].passed
    assert checks["manifest_matches_launch"].passed


def test_capacity_check_blocks(tmp_path):
    ws = _workspace(tmp_path)
    res = _run(ws, launch=TrainingLaunch(nproc_per_node=2, num_workers=2))
    checks = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert checks["num_used_data_capacity"].passed is False
    assert not res.success  # blocking ERROR check fails the run before anything downstream
    problems = checks["num_used_data_capacity"].metadata["problems"].value
    assert any("t2i_pretrain: 3 files for world_size 2 x num_workers 2 = 4 readers" in p for p in problems)
