"""Every bad-input class ends in an exact, counted quarantine entry with its reason (never a crash)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_index_fixtures import (
    caption,
    good_t2i,
    image_bytes,
    png_declaring,
    reasons,
    registry_for,
    run_index,
    vlm_line,
    write_edit,
    write_t2i,
    write_vlm,
)

from bagel_core.config.errors import DataError
from bagel_core.index import pool, units


def _quarantine_rows(q: pa.Table, reason: str) -> list[dict]:
    return [r for r in q.to_pylist() if r["reason"] == reason]


def test_truncated_parquet_is_recorded_as_unreadable_file(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    good_t2i(d / "chunk_0.parquet", n=6)
    bad = good_t2i(d / "chunk_1.parquet", n=6)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result, index, q, files = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {"file_unreadable": 1}
    (row,) = _quarantine_rows(q, "file_unreadable")
    assert row["source_file"] == str(bad) and row["file_row"] == -1 and "footer" in row["message"]
    frow = next(f for f in files.to_pylist() if f["source_file"] == str(bad))
    assert frow["status"] == "unreadable" and frow["rows_read"] == 0 and frow["size"] == len(data) // 2
    assert index.num_rows == 6 and set(index.column("status").to_pylist()) == {"ok"}
    # the unreadable shard is left out of parquet_info (the loader cannot read it)
    info = json.loads(result.parquet_info["t2i_pretrain.t2i"].read_text())
    assert list(info) == [str(d / "chunk_0.parquet")]


def test_missing_and_renamed_columns_quarantine_every_row(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    pq.write_table(
        pa.table({"image": [image_bytes()] * 5, "caption": [caption()] * 5}),
        d.mkdir() or d / "a.parquet",
        row_group_size=2,
    )
    pq.write_table(pa.table({"image": [image_bytes()] * 3, "captions": [1, 2, 3]}), d / "b.parquet")
    _, index, q, files = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {"missing_column": 5, "column_type": 3}
    assert "column 'captions' is missing (found: image, caption)" in _quarantine_rows(q, "missing_column")[0]["message"]
    message = _quarantine_rows(q, "column_type")[0]["message"]
    assert "column 'captions' has type int64, expected string or binary" in message
    # row groups / row numbers are exact even though no data was read
    a_rows = [
        (r["row_group"], r["row_index"], r["file_row"])
        for r in index.to_pylist()
        if r["source_file"].endswith("a.parquet")
    ]
    assert a_rows == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3), (2, 0, 4)]
    assert sorted(files.column("status").to_pylist()) == ["schema_error", "schema_error"]


def test_edit_columns_with_wrong_nesting_are_a_column_type_error(tmp_path: Path) -> None:
    d = tmp_path / "edit"
    d.mkdir()
    pq.write_table(
        pa.table({"image_list": [[image_bytes(), image_bytes()]], "instruction_list": [["make it blue"]]}),
        d / "chunk_0.parquet",
    )
    _, _, q, _ = run_index(registry_for(edit={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {"column_type": 1}
    assert "instruction_list" in q.column("message")[0].as_py()


def test_bad_image_cells(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    images = [
        image_bytes(),  # 0 ok
        b"\x89PNG garbage that is not an image",  # 1 corrupt
        b"",  # 2 zero bytes
        png_declaring(100_000, 100_000),  # 3 decompression bomb
        image_bytes(64, 64)[:-30],  # 4 truncated
        None,  # 5 null cell
        image_bytes(20, 10, "JPEG"),  # 6 ok
    ]
    write_t2i(d / "chunk_0.parquet", images, [caption()] * len(images), row_group_size=3)
    _, index, q, _ = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {
        "image_corrupt": 1,
        "image_empty": 1,
        "image_too_large": 1,
        "image_truncated": 1,
        "image_missing": 1,
    }
    by_row = {r["file_row"]: r for r in index.to_pylist()}
    assert [by_row[i]["reason"] for i in range(7)] == [
        None,
        "image_corrupt",
        "image_empty",
        "image_too_large",
        "image_truncated",
        "image_missing",
        None,
    ]
    assert by_row[0]["image_sizes"] == [[32, 24]] and by_row[6]["image_sizes"] == [[20, 10]]
    assert by_row[3]["image_sizes"] == [[-1, -1]]
    assert (by_row[4]["row_group"], by_row[4]["row_index"]) == (1, 1)
    assert "100000x100000" in by_row[3]["message"] or "decompression bomb" in by_row[3]["message"]


def test_pixel_cap_option(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    write_t2i(d / "c.parquet", [image_bytes(10, 10), image_bytes(100, 100)], [caption()] * 2)
    _, _, q, _ = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out", max_pixels=5000)
    assert reasons(q) == {"image_too_large": 1}
    assert q.column("file_row").to_pylist() == [1]


def test_bad_captions(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    caps = [
        caption(),  # ok
        "a plain sentence",  # not JSON
        "",  # empty string
        "{}",  # empty object
        json.dumps(["a", "b"]),  # list (crashes upstream)
        json.dumps({"short": 3}),  # value of the wrong type
        None,  # null
        json.dumps({"short": "  "}),  # blank caption
        "42",  # JSON number
    ]
    write_t2i(d / "c.parquet", [image_bytes()] * len(caps), caps)
    _, index, q, _ = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {"caption_not_json": 1, "caption_empty": 4, "caption_wrong_type": 3}
    assert index.column("reason").to_pylist() == [
        None,
        "caption_not_json",
        "caption_empty",
        "caption_empty",
        "caption_wrong_type",
        "caption_wrong_type",
        "caption_empty",
        "caption_empty",
        "caption_wrong_type",
    ]
    assert index.column("num_texts").to_pylist()[0] == 2


def test_invalid_utf8_in_parquet_strings(tmp_path: Path) -> None:
    """DuckDB refuses the whole row group; the pyarrow fallback quarantines just the bad row."""
    d = tmp_path / "t2i"
    raw = [caption("x").encode(), b'{"short": "caf\xe9"}', caption("y").encode()]
    binary = pa.array(raw, pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(raw), binary.buffers())  # no UTF-8 validation
    d.mkdir()
    pq.write_table(pa.table({"image": [image_bytes()] * 3, "captions": strings}), d / "c.parquet")
    _, index, q, _ = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert reasons(q) == {"invalid_utf8": 1}
    assert index.column("reason").to_pylist() == [None, "invalid_utf8", None]


def test_edit_count_rules(tmp_path: Path) -> None:
    d = tmp_path / "edit"
    img = image_bytes()
    write_edit(
        d / "chunk_0.parquet",
        [[img, img], [img, img, img], [img], [img, img], [img, b"junk"], [img, img]],
        [[["make it red"]], [["a"]], [], [["a"], ["b"]], [["a"]], [[]]],
    )
    _, index, q, _ = run_index(registry_for(edit={"data_dir": d}), tmp_path / "out")
    assert index.column("reason").to_pylist() == [
        None,
        "edit_count_mismatch",
        "edit_too_few_images",
        "edit_count_mismatch",
        "image_corrupt",
        "instruction_invalid",
    ]
    assert reasons(q) == {
        "edit_count_mismatch": 2,
        "edit_too_few_images": 1,
        "image_corrupt": 1,
        "instruction_invalid": 1,
    }
    first = index.slice(0, 1).to_pylist()[0]
    assert first["image_sizes"] == [[32, 24], [32, 24]] and first["num_images"] == 2
    assert (first["row_group"], index.column("row_group")[5].as_py(), index.column("row_index")[5].as_py()) == (0, 2, 1)


def test_vlm_bad_lines(tmp_path: Path) -> None:
    images = {"a.png": image_bytes(30, 20), "b.jpg": image_bytes(10, 40, "JPEG"), "bad.png": b"nope"}
    lines = [
        vlm_line("a.png"),  # 0 ok
        '{"id": "broken", "conversations": [',  # 1 broken JSON
        vlm_line("missing.png"),  # 2 missing image file
        vlm_line(["a.png", "b.jpg"]),  # 3 two images, one placeholder
        b'{"id": "\xff\xfe", "conversations": []}',  # 4 invalid UTF-8
        vlm_line(["a.png", "b.jpg"], "<image><image> compare"),  # 5 ok, two images
        vlm_line(None, "no image here"),  # 6 ok, text only
        vlm_line("bad.png"),  # 7 corrupt image file
        vlm_line("a.png", answer=""),  # 8 no loss
        "",  # 9 blank line
        vlm_line(None),  # 10 placeholder without image
        '["a", "list"]',  # 11 not an object
    ]
    img_dir, jsonl = write_vlm(tmp_path / "vlm", lines, images)
    _, index, q, _ = run_index(registry_for(vlm={"data_dir": img_dir, "jsonl_path": jsonl}), tmp_path / "out")
    assert index.column("reason").to_pylist() == [
        None,
        "json_invalid",
        "image_missing",
        "image_placeholder_mismatch",
        "invalid_utf8",
        None,
        None,
        "image_corrupt",
        "no_loss",
        "json_invalid",
        "image_placeholder_mismatch",
        "record_invalid",
    ]
    assert reasons(q) == {
        "json_invalid": 2,
        "image_missing": 1,
        "image_placeholder_mismatch": 2,
        "invalid_utf8": 1,
        "image_corrupt": 1,
        "no_loss": 1,
        "record_invalid": 1,
    }
    rows = index.to_pylist()
    assert [r["row_index"] for r in rows] == list(range(12)) and {r["row_group"] for r in rows} == {-1}
    assert rows[5]["image_sizes"] == [[30, 20], [10, 40]] and rows[5]["num_images"] == 2
    assert rows[5]["image_paths"] == [str(img_dir / "a.png"), str(img_dir / "b.jpg")]
    assert rows[6]["image_sizes"] == [] and rows[6]["num_images"] == 0
    assert "missing.png" in rows[2]["message"]


def test_vlm_line_numbers_across_chunks_and_crlf(tmp_path: Path) -> None:
    """Small JSONL ranges (several per file, run on the process pool) keep exact line numbers."""
    images = {"a.png": image_bytes()}
    lines = [vlm_line("a.png") if i % 7 else '{"broken' for i in range(50)]
    img_dir, jsonl = write_vlm(tmp_path / "vlm", lines, images)
    jsonl.write_bytes(jsonl.read_bytes().replace(b"\n", b"\r\n"))
    _, index, q, _ = run_index(
        registry_for(vlm={"data_dir": img_dir, "jsonl_path": jsonl}),
        tmp_path / "out",
        jsonl_chunk_bytes=300,
        workers=2,
        min_rows_for_pool=0,
    )
    assert index.column("row_index").to_pylist() == list(range(50))
    assert q.column("file_row").to_pylist() == list(range(0, 50, 7))
    assert reasons(q) == {"json_invalid": 8}


def test_missing_jsonl_is_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _, index, q, files = run_index(
        registry_for(vlm={"data_dir": tmp_path / "images", "jsonl_path": tmp_path / "nope.jsonl"}), tmp_path / "out"
    )
    assert index.num_rows == 0 and reasons(q) == {"file_unreadable": 1}
    assert files.column("status").to_pylist() == ["unreadable"]


def test_corrupt_row_group_quarantines_its_rows_only(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    path = good_t2i(d / "c.parquet", n=8, row_group_size=4)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)  # the image column chunk of row group 1
    data = bytearray(path.read_bytes())
    chunk_start = col.dictionary_page_offset or col.data_page_offset
    start, end = col.data_page_offset, chunk_start + col.total_compressed_size
    data[start:end] = b"\x07" * (end - start)  # garbage page header + data, footer untouched
    path.write_bytes(bytes(data))
    _, index, q, files = run_index(registry_for(t2i={"data_dir": d}), tmp_path / "out")
    assert index.column("status").to_pylist() == ["ok"] * 4 + ["quarantined"] * 4
    assert reasons(q) == {"row_group_unreadable": 4}
    assert set(q.column("row_group").to_pylist()) == {1}
    assert files.column("ok").to_pylist() == [4] and files.column("quarantined").to_pylist() == [4]


def test_empty_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "t2i").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files directly in .*t2i"):
        run_index(registry_for(t2i={"data_dir": tmp_path / "t2i"}), tmp_path / "out")


def test_worker_crash_is_retried_then_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies (segfault stand-in) never loses rows: the unit is retried, then quarantined."""
    d = tmp_path / "t2i"
    good_t2i(d / "a.parquet", n=5, row_group_size=2)
    bad = good_t2i(d / "b.parquet", n=5, row_group_size=2)
    good_t2i(d / "c.parquet", n=5, row_group_size=2)
    monkeypatch.setenv(units.CRASH_ENV, str(bad))
    # spawned workers see this environment (the shared fork server may predate the variable)
    monkeypatch.setattr(pool, "_mp_context", lambda: multiprocessing.get_context("spawn"))
    _, index, q, _ = run_index(
        registry_for(t2i={"data_dir": d}), tmp_path / "out", workers=2, min_rows_for_pool=0, unit_rows=2, sql_scan=False
    )  # all rows through units
    assert reasons(q) == {"worker_crashed": 5}
    assert q.column("file_row").to_pylist() == [0, 1, 2, 3, 4]
    assert index.num_rows == 15 and index.column("status").to_pylist().count("ok") == 10


def test_vlm_video_records(tmp_path: Path) -> None:
    video_q = "<video>\nWhat happens?"
    lines = [
        {
            "id": "v0",
            "video": "clip.mp4",
            "conversations": [{"from": "human", "value": video_q}, {"from": "gpt", "value": "A ball rolls."}],
        },
        {
            "id": "v1",
            "video": "gone.mp4",
            "conversations": [{"from": "human", "value": video_q}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "v2",
            "video": "clip.mp4",
            "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}],
        },
    ]
    img_dir, jsonl = write_vlm(tmp_path / "vlm", lines, {"clip.mp4": b"\x00\x00\x00\x18ftypmp42"})
    _, index, q, _ = run_index(registry_for(vlm={"data_dir": img_dir, "jsonl_path": jsonl}), tmp_path / "out")
    assert index.column("reason").to_pylist() == [None, "video_missing", "video_placeholder_missing"]
    first = index.slice(0, 1).to_pylist()[0]
    assert first["video_path"] == str(img_dir / "clip.mp4") and first["num_images"] == 0
    assert first["image_paths"] == [] and first["image_sizes"] == []
    assert reasons(q) == {"video_missing": 1, "video_placeholder_missing": 1}
