"""Data faults: a truncated shard among the example's files is registered with a warning (not an error),
quarantined by the index as file_unreadable, and left out of the sampling plan; whether the job goes on is the
quarantine-ratio check's decision."""

from __future__ import annotations

import itertools
import os

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest
from packed_fixtures import make_dataset, make_manifest, small_fixture

from assets.dataset_index import CHECK_QUARANTINE_RATIO, dataset_index
from assets.example import dataset_registry, example_dataset, example_zip
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import manifest_matches_launch, num_used_data_capacity, sampling_manifest
from assets.token_stats import position_table_fits, token_cap_violations, token_stats
from bagel_core.config.errors import DataError

EXAMPLE = {"t2i_files": 4, "t2i_rows_per_file": 3, "edit_files": 2, "vlm_lines": 6}
DATA = [dataset_registry, dataset_index, token_stats, sampling_manifest]
CHECKS = [token_cap_violations, position_table_fits, num_used_data_capacity, manifest_matches_launch]
LAUNCH = TrainingLaunch(nproc_per_node=1, num_workers=1)


def _run(ws, instance, max_ratio: float):
    return dg.materialize(
        [*DATA, *CHECKS],
        instance=instance,
        resources={"workspace": ws, "launch": LAUNCH},
        run_config={
            "ops": {
                "dataset_index": {"config": {"max_quarantine_ratio": max_ratio, "workers": 1}},
                "sampling_manifest": {"config": {"simulate": False}},
            }
        },
        raise_on_error=False,
    )


def test_a_truncated_shard_is_quarantined_and_left_out_and_the_ratio_check_decides(tmp_path, fault):
    ws = PipelineWorkspace(root=str(tmp_path / "ws"))
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [example_zip, example_dataset],
            instance=instance,
            resources={"workspace": ws},
            run_config={"ops": {"example_zip": {"config": EXAMPLE}}},
        ).success
        shard = ws.example_dir / "bagel_example" / "t2i" / "chunk_0.parquet"
        shard.write_bytes(shard.read_bytes()[:100])  # a failed copy: footer gone

        strict = _run(ws, instance, max_ratio=0.05)
        checks = {e.check_name: e for e in strict.get_asset_check_evaluations()}
        assert checks["registry_valid"].passed  # registered: a warning, not an error
        warnings = str(checks["registry_valid"].metadata["warnings"].value)
        assert "chunk_0.parquet: cannot read the parquet footer" in warnings and "file_unreadable" in warnings
        assert not strict.success and not checks[CHECK_QUARANTINE_RATIO].passed
        assert checks[CHECK_QUARANTINE_RATIO].metadata["ratios"].value["t2i_pretrain.t2i"] == 0.25  # 3 of 12 rows

        tolerant = _run(ws, instance, max_ratio=0.5)
        assert tolerant.success, [e.message for e in tolerant.all_events if e.is_failure]
    quarantine = pl.read_parquet(ws.index_dir / "quarantine.parquet")
    unreadable = quarantine.filter(pl.col("reason") == "file_unreadable")
    assert unreadable.height == 1 and unreadable["source_file"][0].endswith("t2i/chunk_0.parquet")
    units = pq.read_table(ws.manifest_dir / "manifest.parquet").to_pylist()
    t2i_files = {u["source_file"] for u in units if u["group"] == "t2i_pretrain"}
    assert t2i_files and not [f for f in t2i_files if f.endswith("chunk_0.parquet")]
    fault(
        "a truncated T2I shard (footer gone) among the example's files",
        "registry_valid passes with a warning naming the file; the index quarantines it as file_unreadable "
        "(counted at its estimated 3 rows: 25 %); quarantine_ratio stops the job at 5 % and lets it go on at 50 %; "
        "the manifest leaves the file out",
    )


def _packed_files(batches) -> set[str]:
    return {os.path.realpath(d["source_file"]) for b in batches for d in b["batch_data_indexes"]}


def test_shards_changed_or_deleted_after_planning_are_skipped_counted_then_stop_the_run(tmp_path, fault):
    fx = small_fixture(tmp_path / "data", t2i_files=3)
    manifest = make_manifest(fx, tmp_path / "manifest")
    rewritten, deleted = fx.t2i_files[0], fx.t2i_files[1]
    stamp = rewritten.stat().st_mtime_ns + 5_000_000_000
    os.utime(rewritten, ns=(stamp, stamp))  # rewritten in place with the same size: only the mtime tells
    deleted.unlink()
    ds = make_dataset(fx, manifest)
    batches = list(itertools.islice(iter(ds), 6))
    skipped = ds.counters()["skipped"]["t2i_pretrain"]
    reasons = " | ".join(skipped)
    assert f"{rewritten} changed since planning (size" in reasons and f"{deleted} is gone since planning" in reasons
    assert not _packed_files(batches) & {os.path.realpath(rewritten), os.path.realpath(deleted)}
    assert os.path.realpath(fx.t2i_files[2]) in _packed_files(batches)  # the intact file still trains

    strict = make_dataset(fx, manifest, max_bad_files=1)
    with pytest.raises(DataError, match=r"2 files of this worker are unreadable or changed since planning \(more "
                       r"than --max_bad_files 1\)"):  # fmt: skip
        list(itertools.islice(iter(strict), 6))
    fault(
        "a shard rewritten (same size, new mtime) and another deleted after planning",
        "each is skipped unread and counted with its reason (changed / gone since planning), the intact shard "
        "still trains; with `--max_bad_files 1` the loader stops with a DataError naming the limit and the fix",
    )
