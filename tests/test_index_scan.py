"""The DuckDB scan tier (``bagel_core.index.scan``) only accepts what the per-row checks accept, with
the same values.

Each test writes cells to parquet, runs :func:`scan.scan_files` directly and compares every row it
accepted with :func:`checks.check_t2i` / :func:`checks.check_edit` on the same cells; the tests also
assert how much was accepted, so a scan that accepts nothing cannot pass them. The end-to-end
differential tests (scan + per-row vs per-row only) live in ``test_index_fast_path.py``.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_index_fixtures import _variants, image_bytes, png_declaring, registry_for, write_edit, write_t2i

from bagel_core.index import bulk, checks, indexer, scan, units
from bagel_core.index.indexer import IndexOptions, index_registry
from bagel_core.index.probe import DEFAULT_MAX_PIXELS


def _scan(paths: list[Path], task: str, query_rows: int = scan.QUERY_ROWS) -> dict[str, scan.FileVerdict | None]:
    """Whole-file verdicts (every file here is scanned as a single range)."""
    con = duckdb.connect(config={"threads": 2})
    try:
        files = {str(p): [(0, pq.ParquetFile(p).metadata.num_rows)] for p in paths}
        out = {}
        for path, lo, hi, verdict in scan.scan_files(con, files, task, DEFAULT_MAX_PIXELS, query_rows):
            assert (lo, hi) == files[path][0]
            out[path] = verdict
        return out
    finally:
        con.close()


def _accepted(verdict: scan.FileVerdict) -> dict[int, tuple[Any, ...]]:
    """file row -> (sizes, modes, image bytes, num_texts, text_chars) for the rows the scan accepted."""
    out: dict[int, tuple[Any, ...]] = {}
    k = 0
    for i, row in enumerate(verdict.file_rows[verdict.ok].tolist()):
        n = int(verdict.counts[i])
        sizes = [(int(verdict.width[k + j]), int(verdict.height[k + j])) for j in range(n)]
        modes = [bulk.MODES[verdict.mode[k + j]] for j in range(n)]
        k += n
        out[row] = (sizes, modes, int(verdict.image_bytes[i]), int(verdict.num_texts[i]), int(verdict.text_chars[i]))
    return out


def _expected(res: checks.SampleResult) -> tuple[Any, ...]:
    return ([tuple(s) for s in res.sizes], res.modes, res.image_bytes, res.num_texts, res.text_chars)


def _captions_corpus(seed: int = 0, mutants: int = 1500) -> list[str]:
    """Hand-picked edge cases of JSON and whitespace, plus random single-character mutations."""
    ws = "".join(chr(c) for c in scan.PY_SPACE)
    cases = [
        '{"short": "a red square", "long": "A red square on a white background."}',
        '{"a":"b"}',
        ' \n{ "a" : "b" }\t',
        '{"a": "b",}',
        '{"a": "b" ,  }',
        '{"a": "b"}  ,',
        '{"a": "b", "a": "c"}',
        '{"a": "b", "b": "b"}',
        '{"": "x"}',
        '{"a": ""}',
        '{"a": "", "b": "x"}',
        "{}",
        "[]",
        '["a"]',
        '"a"',
        "null",
        "1",
        '{"a": null}',
        '{"a": 1}',
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": ["b"]}',
        '{"a": {"b": "c"}}',
        '{"a": "b", "c": 2}',
        '{"a": true}',
        '{"a": "\\ud800"}',
        '{"a": "\\ud83d\\ude00 smile"}',
        '{"a": "\\u00e9t\\u00e9"}',
        '{"a": "x\\u0000y"}',
        '{"a": "\\n"}',
        '{"a": "\\t\\r\\n"}',
        '{"a": "\\u3000\\u00a0"}',
        '{"a": "\\"quoted\\""}',
        '{"a": "back\\\\slash", "b": "\\/"}',
        '{"a": "\\x41"}',
        '{"a": "\\u12"}',
        '{"a": "tab\there"}',
        '\ufeff{"a": "b"}',
        '{"a": "b"}\u00a0',
        '{"a": "b"}{}',
        '{"a": "b"} // c',
        "{'a': 'b'}",
        '{"a": "b"',
        '{"a" "b"}',
        '{"a": "b" "c": "d"}',
        '{a: "b"}',
        '{"a": "b"}}',
        '{"é": "ü", "日本": "語"}',
        '{"a": "' + ws + '"}',
        '{"a": " ", "b": "\\u2003"}',
        '{"a": "\u2028x"}',
        '{"a": "\u0085"}',
        '{"a": "\x1f"}',
        '{"a": "\x7f"}',
        '{"k' + "x" * 300 + '": "v"}',
        '{"a": "' + "y" * 5000 + '"}',
        '{"a": "b", "c": "d", "e": "f", "g": "h"}',
        '{"a":"b","c":"d","a":"e"}',
        "",
    ]
    rng = random.Random(seed)
    alphabet = [
        '"',
        "\\",
        ",",
        ":",
        "{",
        "}",
        "[",
        "]",
        " ",
        "\n",
        "\t",
        "u",
        "0",
        "d8",
        "\u3000",
        "\u00a0",
        "a",
        "é",
        "\x00",
        "NaN",
    ]
    base = [c for c in cases if c.startswith("{") and c.endswith("}")][:12]
    for _ in range(mutants):
        s = rng.choice(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(s))
            op = rng.random()
            if op < 0.4:
                s = s[:i] + rng.choice(alphabet) + s[i:]
            elif op < 0.7:
                s = s[:i] + s[i + 1 :]
            else:
                s = s[:i] + rng.choice(alphabet) + s[i + 1 :]
        cases.append(s)
    return cases


def test_whitespace_table_is_complete() -> None:
    assert scan.PY_SPACE == tuple(c for c in range(sys.maxunicode + 1) if chr(c).isspace())


def test_captions_fuzz_accepts_only_what_json_loads_accepts(tmp_path: Path) -> None:
    captions = _captions_corpus()
    img = image_bytes(20, 10)
    path = write_t2i(tmp_path / "c.parquet", [img] * len(captions), captions, row_group_size=500)
    verdict = _scan([path], "t2i")[str(path)]
    assert verdict is not None and len(verdict.file_rows) == len(captions)
    accepted = _accepted(verdict)
    per_row_ok = 0
    for row, text in enumerate(captions):
        res = checks.check_t2i(img, text, DEFAULT_MAX_PIXELS)
        per_row_ok += not res.problems
        if row in accepted:
            assert not res.problems, (text, res.problems)
            assert accepted[row] == _expected(res), text
    assert len(accepted) >= 0.9 * per_row_ok  # the tier must take (nearly) everything plain
    for plain in (
        '{"a": "\\u00e9t\\u00e9"}',
        '{"a": "\\ud83d\\ude00 smile"}',
        '{"é": "ü", "日本": "語"}',
        ' \n{ "a" : "b" }\t',
        '{"a": "\\"quoted\\""}',
    ):
        assert captions.index(plain) in accepted, plain
    for refused in ('{"a": "b",}', '{"a": "b", "a": "c"}', '{"a": "\\ud800"}', '{"a": "\\n"}', '{"a": NaN}'):
        assert captions.index(refused) not in accepted, refused


def _jpeg_with_big_app_segment() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (33, 17), (1, 2, 3)).save(buf, format="JPEG", exif=b"Exif\x00\x00" + b"\x01" * 3000)
    return buf.getvalue()


def test_images_from_heads_agree_with_the_per_row_probe(tmp_path: Path) -> None:
    good = [data for _, data in _variants()]
    cells: list[Any] = []
    for data in good:
        cells += [data, data + b"x", data[:-1], data[: len(data) // 2]]
    cells += [b"", b"\x00" * 40, None, png_declaring(100_000, 100_000), _jpeg_with_big_app_segment()]
    path = write_t2i(tmp_path / "i.parquet", cells, ['{"a": "b"}'] * len(cells), row_group_size=16)
    verdict = _scan([path], "t2i")[str(path)]
    assert verdict is not None
    accepted = _accepted(verdict)
    for row, cell in enumerate(cells):
        res = checks.check_t2i(cell, '{"a": "b"}', DEFAULT_MAX_PIXELS)
        if row in accepted:
            assert not res.problems and accepted[row] == _expected(res), row
    names = [name for name, _ in _variants()]
    whole = [
        4 * i
        for i, data in enumerate(good)
        if bulk.probe_images(pa.array([data]), DEFAULT_MAX_PIXELS).ok[0] and "exif" not in names[i]
    ]  # a 5 KB EXIF segment puts SOFn past the head
    assert len(whole) >= 10 and all(r in accepted for r in whole)  # what the whole-image probe takes, heads take
    assert len(cells) - 1 not in accepted  # SOFn beyond the head: left to the next tier


def test_edit_rows_agree_with_check_edit(tmp_path: Path) -> None:
    a, b = image_bytes(20, 10), image_bytes(7, 9, "JPEG")
    image_lists = [
        [a, b],
        [a, b, a],
        [a],
        [],
        None,
        [a, None],
        [a, b],
        [a, b],
        [a, b],
        [a, b],
        [a, b],
        [a, b],
        [a, b, b],
        [a, b"junk"],
        [a, b],
    ]
    instructions = [
        [["make it red"]],
        [["x", "y"], ["z"]],
        [],
        [],
        [["a"]],
        [["a"]],
        None,
        [[]],
        [None],
        [["a", None]],
        [[" ", "\u3000"]],
        [[" ", "ok"]],
        [["a"]],
        [["a"]],
        [["caf\u00e9 \U0001f600"]],
    ]
    path = write_edit(tmp_path / "e.parquet", image_lists, instructions, row_group_size=4)
    verdict = _scan([path], "edit")[str(path)]
    assert verdict is not None
    accepted = _accepted(verdict)
    for row, (imgs, instr) in enumerate(zip(image_lists, instructions)):
        res = checks.check_edit(imgs, instr, DEFAULT_MAX_PIXELS)
        if row in accepted:
            assert not res.problems and accepted[row] == _expected(res), row
        else:
            assert res.problems or row in (), row  # every clean edit row here is plain: the scan takes it
    assert sorted(accepted) == [0, 1, 11, 14]


def test_one_unreadable_file_does_not_cost_the_others(tmp_path: Path) -> None:
    good = [write_t2i(tmp_path / f"g{i}.parquet", [image_bytes()] * 5, ['{"a": "b"}'] * 5) for i in range(3)]
    bad_utf8 = tmp_path / "u.parquet"
    raw = b'{"a": "\xff"}'
    arr = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(np.array([0, len(raw)], np.int32).tobytes()), pa.py_buffer(raw)]
    )
    pq.write_table(pa.table({"image": pa.array([image_bytes()], pa.binary()), "captions": arr}), bad_utf8)
    paths = [good[0], bad_utf8, *good[1:]]
    verdicts = _scan(paths, "t2i")
    assert verdicts[str(bad_utf8)] is None  # DuckDB refuses the file: the per-row path names the cell
    for p in good:
        v = verdicts[str(p)]
        assert v is not None and v.ok.all() and v.file_rows.tolist() == list(range(5))


def test_reordered_results_are_refused_not_misattributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [write_t2i(tmp_path / f"g{i}.parquet", [image_bytes()] * 3, ['{"a": "b"}'] * 3) for i in range(2)]
    real = scan._t2i_sql
    monkeypatch.setattr(
        scan, "_SQL", {"t2i": lambda source, first: f"SELECT * FROM ({real(source, first)}) ORDER BY r, f NULLS LAST"}
    )
    verdicts = _scan(paths, "t2i")
    # the two-file query came back interleaved and was refused; each file was then scanned alone
    assert all(v is not None and v.ok.all() for v in verdicts.values())
    monkeypatch.setattr(scan, "_stream", lambda *a: (_ for _ in ()).throw(RuntimeError("out of order")))
    assert _scan(paths, "t2i") == {str(p): None for p in paths}


def test_indexer_sends_only_the_rows_the_scan_left_to_the_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "t2i"
    captions = [json.dumps({"a": f"row {i}"}) for i in range(40)]
    captions[7] = '{"a": "b",}'  # not JSON for Python: quarantined by the per-row path
    captions[23] = '{"a": "\\ud800 lone surrogate"}'  # fine for json.loads, refused by DuckDB's JSON reader
    write_t2i(d / "a.parquet", [image_bytes()] * 40, captions, row_group_size=10)
    checked: list[int] = []
    real = checks.check_t2i

    def spy(image: Any, text: Any, *args: Any) -> checks.SampleResult:
        checked.append(1)
        return real(image, text, *args)

    monkeypatch.setattr(units, "check_t2i", spy)
    result = index_registry(
        registry_for(t2i={"data_dir": d}), tmp_path / "out", IndexOptions(workers=1, fast_path=True)
    )
    index = pq.read_table(result.index_path)
    assert index.column("file_row").to_pylist() == list(range(40))
    assert index.column("status").to_pylist().count("quarantined") == 1
    assert index.column("reason").to_pylist()[7] == "caption_not_json"
    assert index.column("row_group").to_pylist() == [i // 10 for i in range(40)]
    assert index.column("row_index").to_pylist() == [i % 10 for i in range(40)]
    assert len(checked) == 1  # row 23 went to the Arrow tier (which takes it); row 7 alone reached check_t2i
    assert result.datasets[0].scan_accepted == 38
    assert index.column("status").to_pylist()[23] == "ok" and index.column("text_chars").to_pylist()[23] == 16


def test_big_files_are_scanned_in_ranges_of_whole_units(tmp_path: Path) -> None:
    captions = [json.dumps({"a": f"row {i}"}) for i in range(40)]
    captions[13] = "not json"
    big = write_t2i(tmp_path / "big.parquet", [image_bytes()] * 40, captions, row_group_size=10)
    small = [write_t2i(tmp_path / f"s{i}.parquet", [image_bytes()] * 3, ['{"a": "b"}'] * 3) for i in range(3)]
    files = {
        str(small[0]): [(0, 3)],
        str(big): [(0, 10), (10, 20), (20, 30), (30, 40)],
        str(small[1]): [(0, 3)],
        str(small[2]): [(0, 3)],
    }
    con = duckdb.connect(config={"threads": 2})
    try:
        got = list(scan.scan_files(con, files, "t2i", DEFAULT_MAX_PIXELS, query_rows=25))
    finally:
        con.close()
    assert [(Path(p).name, lo, hi) for p, lo, hi, _ in got] == [
        ("s0.parquet", 0, 3),
        ("big.parquet", 0, 20),
        ("big.parquet", 20, 40),
        ("s1.parquet", 0, 3),
        ("s2.parquet", 0, 3),
    ]
    for path, lo, hi, verdict in got:
        assert verdict is not None and verdict.file_rows.tolist() == list(range(lo, hi))
    big_ok = np.concatenate([v.ok for p, _, _, v in got if p == str(big)])
    assert np.flatnonzero(~big_ok).tolist() == [13]


def test_indexer_with_tiny_queries_matches_the_per_row_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scan ranges, small-file groups and leftover units together give exactly the per-row index."""
    d = tmp_path / "t2i"
    rng = random.Random(1)
    corpus = _captions_corpus(seed=3, mutants=60)
    for f in range(4):
        n = rng.randint(5, 30)
        images = [
            rng.choice([image_bytes(9, 7), image_bytes(5, 5, "JPEG")] * 3 + [b"junk", image_bytes(8, 8)[:-3]])
            for _ in range(n)
        ]
        texts = [rng.choice(corpus) if rng.random() < 0.4 else json.dumps({"a": f"x{i}"}) for i in range(n)]
        write_t2i(d / f"c{f}.parquet", images, texts, row_group_size=4)
    monkeypatch.setattr(scan, "QUERY_ROWS", 9)
    reg = registry_for(t2i={"data_dir": d})
    fast = index_registry(reg, tmp_path / "fast", IndexOptions(workers=1, unit_rows=8))
    slow = index_registry(reg, tmp_path / "slow", IndexOptions(workers=1, fast_path=False))
    a, b = pq.read_table(fast.index_path).to_pylist(), pq.read_table(slow.index_path).to_pylist()
    for r in (*a, *b):  # Pillow names its BytesIO by address
        r["message"] = r["message"] and re.sub(r"at 0x[0-9a-f]+", "at 0x?", r["message"])
    assert a == b and sum(r["status"] == "ok" for r in a) >= 10


def test_glob_characters_in_file_names_never_read_another_file(tmp_path: Path) -> None:
    """DuckDB expands ``[1]`` in a path as a glob (matching ``a1.parquet``); the scan must notice the
    file it got is not the one asked for and leave the file to the next tier."""
    write_t2i(tmp_path / "a1.parquet", [image_bytes(10, 10)] * 3, ['{"a": "other file"}'] * 3)
    odd = write_t2i(tmp_path / "a[1].parquet", [image_bytes(20, 20)] * 3, ['{"a": "mine"}'] * 3)
    verdicts = _scan([tmp_path / "a1.parquet", odd], "t2i")
    assert verdicts[str(odd)] is None
    good = verdicts[str(tmp_path / "a1.parquet")]
    assert good is not None and good.ok.all() and good.width.tolist() == [10] * 3
    assert not scan.is_literal_path(str(odd))  # so the indexer never gives it to DuckDB
    for row_group_bytes in (256 << 20, 0):  # units read by Arrow first, or by DuckDB first (big row groups)
        result = index_registry(
            registry_for(t2i={"data_dir": tmp_path}),
            tmp_path / f"out{row_group_bytes}",
            IndexOptions(workers=1, arrow_row_group_bytes=row_group_bytes),
        )
        rows = pq.read_table(result.index_path).to_pylist()
        assert {(Path(r["source_file"]).name, tuple(r["image_sizes"][0]), r["text_chars"]) for r in rows} == {
            ("a1.parquet", (10, 10), 10),
            ("a[1].parquet", (20, 20), 4),
        }


def test_rows_read_back_from_the_part_give_the_same_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond KEEP_ROWS, a file's rows are read back from the run's part (scan rows and unit rows of
    one file merged there): same index as when everything stays in memory."""
    d = tmp_path / "t2i"
    for f in range(3):
        captions = [json.dumps({"a": f"f{f} row {i}"}) for i in range(12)]
        captions[f * 3 + 1] = '{"a": "\\ud800"}'  # left by the scan, taken by the bulk tier
        captions[f * 3 + 2] = "[]"  # quarantined per row
        write_t2i(d / f"c{f}.parquet", [image_bytes()] * 12, captions, row_group_size=4)
    reg = registry_for(t2i={"data_dir": d})
    in_memory = pq.read_table(index_registry(reg, tmp_path / "a", IndexOptions(workers=1)).index_path)
    monkeypatch.setattr(indexer, "KEEP_ROWS", 5)
    read_back = index_registry(reg, tmp_path / "b", IndexOptions(workers=1))
    assert pq.read_table(read_back.index_path).to_pylist() == in_memory.to_pylist()
    assert in_memory.column("status").to_pylist().count("quarantined") == 3
    assert in_memory.column("file_row").to_pylist() == list(range(12)) * 3  # scan and unit rows merged in order
    assert read_back.datasets[0].scan_accepted == 30
