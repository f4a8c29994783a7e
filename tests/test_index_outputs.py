"""Index schema contract, generated parquet_info + registry, incremental re-indexing, partial runs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from test_index_fixtures import (
    good_t2i,
    image_bytes,
    registry_for,
    run_index,
    vlm_line,
    write_edit,
    write_vlm,
)

from bagel_core.config.registry import Registry
from bagel_core.index.indexer import INDEX_SCHEMA, IndexOptions, index_registry
from bagel_core.index.parquet_info import check_parquet_info, parquet_info_for


def _three_datasets(tmp_path: Path) -> Registry:
    t2i = tmp_path / "data" / "t2i"
    for i in range(3):
        good_t2i(t2i / f"chunk_{i}.parquet", n=5, row_group_size=2)
    edit = tmp_path / "data" / "edit"
    img = image_bytes(40, 30)
    for i in range(2):
        write_edit(
            edit / f"chunk_{i}.parquet", [[img, img]] * 6, [[["turn it blue", "make it blue"]]] * 6, row_group_size=2
        )
    img_dir, jsonl = write_vlm(tmp_path / "data" / "vlm", [vlm_line("a.png")] * 4, {"a.png": image_bytes(30, 20)})
    return registry_for(
        t2i={"data_dir": t2i}, edit_multi={"data_dir": edit}, vlm={"data_dir": img_dir, "jsonl_path": jsonl}
    )


def test_index_schema_is_the_published_contract(tmp_path: Path) -> None:
    reg = _three_datasets(tmp_path)
    result, index, q, _ = run_index(reg, tmp_path / "out")
    schema = pq.read_schema(result.index_path)
    expected = {
        "dataset": pa.string(),
        "group": pa.string(),
        "task": pa.string(),
        "source_file": pa.string(),
        "row_group": pa.int32(),
        "row_index": pa.int64(),
        "file_row": pa.int64(),
        "image_sizes": pa.list_(pa.list_(pa.int32())),
        "num_images": pa.int32(),
        "status": pa.string(),
        "reason": pa.string(),
    }
    for name, typ in expected.items():
        assert schema.field(name).type == typ, name
    assert schema.equals(INDEX_SCHEMA)
    assert index.num_rows == 15 + 12 + 4 and q.num_rows == 0
    # registry order, then file order, then row order
    assert index.column("dataset").to_pylist() == ["t2i"] * 15 + ["edit_multi"] * 12 + ["vlm"] * 4
    t2i_rows = index.slice(0, 5).to_pylist()
    assert [(r["row_group"], r["row_index"], r["file_row"]) for r in t2i_rows] == [
        (0, 0, 0),
        (0, 1, 1),
        (1, 0, 2),
        (1, 1, 3),
        (2, 0, 4),
    ]
    assert all(os.path.isabs(p) for p in index.column("source_file").to_pylist())
    assert {r["task"] for r in index.to_pylist()} == {"t2i", "edit", "vlm"}
    assert [s.rows for s in result.datasets] == [15, 12, 4]
    assert all(s.invariant_ok for s in result.datasets)


def test_parquet_info_matches_footers_and_registry_points_at_it(tmp_path: Path) -> None:
    reg = Registry.load(_three_datasets(tmp_path).save(tmp_path / "reg" / "dataset_info.yaml"))
    result, _, _, _ = run_index(reg, tmp_path / "out")
    # one registry: the registered file is updated in place, the JSON is written beside it
    assert result.registry_path == tmp_path / "reg" / "dataset_info.yaml"
    assert not (tmp_path / "out" / "dataset_info.yaml").exists()
    assert result.parquet_info["unified_edit.edit_multi"].parent == tmp_path / "reg" / "parquet_info"
    edit = reg.by_name("edit_multi")
    info = json.loads(result.parquet_info["unified_edit.edit_multi"].read_text())
    assert info == {
        os.path.join(str(edit.data_dir), f"chunk_{i}.parquet"): {"num_row_groups": 3, "num_rows": 6, "num_columns": 2}
        for i in range(2)
    }
    for key, value in info.items():
        assert pq.ParquetFile(key).metadata.num_row_groups == value["num_row_groups"]
    assert set(result.parquet_info) == {"t2i_pretrain.t2i", "unified_edit.edit_multi"}  # no JSONL dataset
    generated = Registry.load(result.registry_path)
    assert generated.to_dict() == result.registry.to_dict()
    assert generated.by_name("edit_multi").parquet_info_path == result.parquet_info["unified_edit.edit_multi"]
    # T2I gets its JSON written but not registered: upstream's T2I class takes no parquet_info argument
    assert generated.by_name("t2i").parquet_info_path is None
    assert generated.by_name("vlm").parquet_info_path is None
    assert [(e.num_files, e.num_total_samples) for e in generated.entries] == [(3, 15), (2, 12), (None, 4)]
    assert generated.by_name("vlm").jsonl_path == reg.by_name("vlm").jsonl_path
    # diagnosing a hand-written JSON: placeholder keys and a wrong row-group count
    hand = {
        "your_data_path/x/chunk_0.parquet": {"num_row_groups": 3},
        os.path.join(str(edit.data_dir), "chunk_1.parquet"): {"num_row_groups": 10},
    }
    gen, left_out = parquet_info_for(
        edit, tmp_path / "out" / "datasets" / "unified_edit" / "edit_multi" / "files.parquet"
    )
    problems = check_parquet_info(edit, hand, gen)
    assert left_out == []
    assert any("your_data_path" in p for p in problems)
    assert any("chunk_0.parquet is missing" in p for p in problems)
    assert any("num_row_groups is 10, the footer has 3" in p for p in problems)


def test_incremental_reindex_reads_only_changed_files(tmp_path: Path) -> None:
    reg = _three_datasets(tmp_path)
    out = tmp_path / "out"
    _, index1, _, files1 = run_index(reg, out)
    assert not any(files1.column("reused").to_pylist())

    second, index2, _, files2 = run_index(reg, out)
    assert all(files2.column("reused").to_pylist())
    assert index2.equals(index1)
    assert [s.files_reindexed for s in second.datasets] == [0, 0, 0]

    # change one T2I shard (new content), remove another, replace one VLM image
    t2i_dir = reg.by_name("t2i").data_dir
    good_t2i(t2i_dir / "chunk_1.parquet", n=7, row_group_size=3)
    (t2i_dir / "chunk_2.parquet").unlink()
    img_dir = reg.by_name("vlm").data_dir
    (img_dir / "a.png").write_bytes(b"broken now")
    _, index3, q3, files3 = run_index(reg, out)
    reused = {(r["dataset"], Path(r["source_file"]).name): r["reused"] for r in files3.to_pylist()}
    assert reused == {
        ("t2i", "chunk_0.parquet"): True,
        ("t2i", "chunk_1.parquet"): False,
        ("edit_multi", "chunk_0.parquet"): True,
        ("edit_multi", "chunk_1.parquet"): True,
        ("vlm", "data.jsonl"): False,
    }
    assert index3.num_rows == 5 + 7 + 12 + 4
    assert q3.column("reason").to_pylist() == ["image_corrupt"] * 4
    # one part per dataset run: reused rows were copied into it, older runs' parts are gone
    parts = list((out / "datasets" / "t2i_pretrain" / "t2i" / "parts").iterdir())
    t2i_files = [r for r in files3.to_pylist() if r["dataset"] == "t2i"]
    assert len(parts) == 1 and {r["part"] for r in t2i_files} == {str(parts[0])}
    reader = pa.ipc.open_file(pa.memory_map(str(parts[0])))
    for r in t2i_files:
        rows = pa.Table.from_batches([reader.get_batch(i) for i in r["part_batches"]], schema=reader.schema)
        assert rows.column("file_row").to_pylist() == list(range(r["rows_read"]))
        assert set(rows.column("source_file").to_pylist()) == {r["source_file"]}

    # an option that changes results (pixel cap) invalidates every file
    fourth = index_registry(reg, out, IndexOptions(workers=1, max_pixels=100))
    assert sum(s.files_reused for s in fourth.datasets) == 0
    assert sum(s.quarantined for s in fourth.datasets) == fourth.rows


def test_partial_runs_keep_other_datasets_and_pool_path(tmp_path: Path) -> None:
    reg = _three_datasets(tmp_path)
    out = tmp_path / "out"
    r1 = index_registry(reg, out, IndexOptions(workers=2, unit_rows=2, min_rows_for_pool=0), datasets=["t2i"])
    assert [s.dataset for s in r1.datasets] == ["t2i"]
    assert pq.read_table(r1.index_path).num_rows == 15
    r2 = index_registry(
        reg,
        out,
        IndexOptions(workers=2, unit_rows=2, min_rows_for_pool=0),
        datasets=["unified_edit.edit_multi", "vlm"],
    )
    index = pq.read_table(r2.index_path)
    assert index.num_rows == 31
    assert index.column("dataset").to_pylist() == ["t2i"] * 15 + ["edit_multi"] * 12 + ["vlm"] * 4
    assert set(index.column("status").to_pylist()) == {"ok"}


def test_duckdb_streaming_reader_gives_the_same_index(tmp_path: Path) -> None:
    """Row groups above ``arrow_row_group_bytes`` stream through DuckDB; the result must not change."""
    reg = _three_datasets(tmp_path)
    a = index_registry(reg, tmp_path / "a", IndexOptions(workers=1))
    b = index_registry(reg, tmp_path / "b", IndexOptions(workers=1, arrow_row_group_bytes=0, batch_rows=3))
    assert pq.read_table(a.index_path).equals(pq.read_table(b.index_path))


def test_registered_parquet_info_is_checked_against_the_shards(tmp_path: Path) -> None:
    reg = _three_datasets(tmp_path)
    edit = reg.by_name("edit_multi")
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({f"your_data_path/edit/chunk_{i}.parquet": {"num_row_groups": 3} for i in range(2)}))
    reg.entries[1] = dataclasses.replace(edit, parquet_info_path=hand)
    result = index_registry(reg, tmp_path / "out", IndexOptions(workers=1))
    problems = result.parquet_info_problems["unified_edit.edit_multi"]
    assert sum("your_data_path" in p for p in problems) == 2
    assert sum("is missing: the upstream loader would silently drop" in p for p in problems) == 2
    assert set(result.parquet_info_problems) == {"unified_edit.edit_multi"}
