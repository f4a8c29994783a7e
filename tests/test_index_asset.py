"""Dagster ``dataset_index``: unpartitioned job run indexes all datasets, per-partition runs, checks."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
from test_index_fixtures import good_t2i, image_bytes, registry_for, vlm_line, write_t2i, write_vlm

from assets.dataset_index import (
    CHECK_ACCOUNTING,
    CHECK_QUARANTINE_RATIO,
    CHECK_UNIQUE_KEYS,
    DATASET_PARTITIONS,
    dataset_index,
)
from assets.resources import PipelineWorkspace


def _workspace(tmp_path: Path, bad_rows: int = 0) -> PipelineWorkspace:
    ws = PipelineWorkspace(root=str(tmp_path / "ws"))
    t2i = tmp_path / "data" / "t2i"
    good_t2i(t2i / "chunk_0.parquet", n=6)
    if bad_rows:
        write_t2i(t2i / "chunk_1.parquet", [b""] * bad_rows, ['{"a": "b"}'] * bad_rows)
    img_dir, jsonl = write_vlm(tmp_path / "data" / "vlm", [vlm_line("a.png")] * 3, {"a.png": image_bytes()})
    registry_for(t2i={"data_dir": t2i}, vlm={"data_dir": img_dir, "jsonl_path": jsonl}).save(ws.registry_path)
    return ws


@dg.asset(name="dataset_registry")
def _registry_stand_in() -> dg.MaterializeResult:
    return dg.MaterializeResult()


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_unpartitioned_run_indexes_every_dataset_and_records_partitions(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    with dg.instance_for_test() as instance:
        res = dg.materialize(
            [_registry_stand_in, dataset_index],
            instance=instance,
            resources={"workspace": ws},
            run_config={"ops": {"dataset_index": {"config": {"workers": 1}}}},
        )
        assert res.success
        assert _checks(res) == {CHECK_ACCOUNTING: True, CHECK_QUARANTINE_RATIO: True, CHECK_UNIQUE_KEYS: True}
        assert instance.get_dynamic_partitions(DATASET_PARTITIONS.name) == ["t2i_pretrain.t2i", "vlm_sft.vlm"]
        mats = res.asset_materializations_for_node("dataset_index")
        by_partition = {m.partition: m.metadata for m in mats}
        assert set(by_partition) == {None, "t2i_pretrain.t2i", "vlm_sft.vlm"}
        assert by_partition[None]["rows"].value == 9
        assert by_partition["t2i_pretrain.t2i"]["rows"].value == 6
        assert by_partition[None]["quarantined"].value == 0
        assert "data:image/png;base64," in by_partition[None]["image_size_distribution"].value
        assert by_partition[None]["rows_per_s"].value > 0
        assert pq.read_table(ws.index_dir / "index.parquet").num_rows == 9
        assert (ws.registry_path.parent / "parquet_info" / "t2i.json").is_file()

        # per-dataset partition run: only that dataset is (re)considered, the union keeps both
        res2 = dg.materialize(
            [dataset_index],
            instance=instance,
            resources={"workspace": ws},
            partition_key="vlm_sft.vlm",
            selection=[dataset_index.key],
            run_config={"ops": {"dataset_index": {"config": {"workers": 1}}}},
        )
        assert res2.success
        (mat,) = res2.asset_materializations_for_node("dataset_index")
        assert mat.partition == "vlm_sft.vlm" and mat.metadata["rows"].value == 3
        assert mat.metadata["files_reused"].value == 1
        assert pq.read_table(ws.index_dir / "index.parquet").num_rows == 9


def test_quarantine_ratio_check_blocks(tmp_path: Path) -> None:
    ws = _workspace(tmp_path, bad_rows=2)
    with dg.instance_for_test() as instance:
        res = dg.materialize(
            [_registry_stand_in, dataset_index],
            instance=instance,
            resources={"workspace": ws},
            run_config={"ops": {"dataset_index": {"config": {"workers": 1, "max_quarantine_ratio": 0.1}}}},
            raise_on_error=False,
        )
        assert not res.success  # blocking ERROR check fails the step
        checks = _checks(res)
        assert checks[CHECK_QUARANTINE_RATIO] is False and checks[CHECK_ACCOUNTING] is True
        evaluation = next(e for e in res.get_asset_check_evaluations() if e.check_name == CHECK_QUARANTINE_RATIO)
        assert evaluation.metadata["over_threshold"].value == {"t2i_pretrain.t2i": 0.25}
        # raising the threshold in run config lets it pass
        res = dg.materialize(
            [_registry_stand_in, dataset_index],
            instance=instance,
            resources={"workspace": ws},
            run_config={"ops": {"dataset_index": {"config": {"workers": 1, "max_quarantine_ratio": 0.5}}}},
        )
        assert res.success


def test_partition_of_a_removed_dataset_fails_clearly(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_PARTITIONS.name, ["vlm_sft.gone"])
        res = dg.materialize(
            [dataset_index],
            instance=instance,
            resources={"workspace": ws},
            partition_key="vlm_sft.gone",
            selection=[dataset_index.key],
            raise_on_error=False,
        )
        assert not res.success
        failure = next(e for e in res.all_events if e.is_step_failure)
        assert "partition(s) ['vlm_sft.gone'] are not datasets of" in str(failure.step_failure_data.error)
