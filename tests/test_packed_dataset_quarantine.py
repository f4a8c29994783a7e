"""Known-bad samples are never read at training time: the index's quarantine list travels with the
manifest (``bagel data plan --index``) and the packed dataset passes those rows over unread and
undecoded, counted under ``quarantined`` per group and index reason."""

from __future__ import annotations

import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packed_fixtures import make_dataset, small_fixture

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import DataError
from bagel_core.config.registry import Registry
from bagel_core.index.schema import QUARANTINE_SCHEMA
from bagel_core.loader import packed_dataset
from bagel_core.loader.readers import UnitStream
from bagel_core.plan.manifest import build_manifest, format_manifest_table, read_manifest_meta, write_manifest
from bagel_core.plan.quarantine import QUARANTINE_FILE, Quarantine, read_index_quarantine


def _row(fx, group, dataset, task, path, row_group, row_index, reason):
    return {
        "dataset": dataset,
        "group": group,
        "task": task,
        "source_file": str(path),
        "row_group": row_group,
        "row_index": row_index,
        "file_row": row_index,
        "reason": reason,
        "message": f"{reason} (test)",
    }


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The small fixture with an index quarantine list as `bagel data index` writes it: one T2I row, one
    VLM line and one whole edit file (opened by nobody: ``row_group = row_index = -1``)."""
    fx = small_fixture(tmp_path_factory.mktemp("quarantine") / "data")
    rows = [
        _row(fx, "t2i_pretrain", "t2i", "t2i", fx.t2i_files[0], 0, 1, "image_corrupt"),
        _row(fx, "t2i_pretrain", "t2i", "t2i", fx.t2i_files[1], 1, 0, "caption_invalid"),
        _row(fx, "vlm_sft", "llava", "vlm", fx.jsonl, -1, 0, "image_missing"),
        _row(fx, "unified_edit", "seedx", "edit", fx.edit_files[1], -1, -1, "file_unreadable"),
        _row(fx, "other_group", "elsewhere", "t2i", fx.t2i_files[0], 0, 0, "image_corrupt"),  # not configured
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), fx.index_dir / QUARANTINE_FILE)
    return fx


def _plan(fx, out, index=True):
    config, registry = load_dataset_config(fx.groups), Registry.load(fx.registry)
    manifest = build_manifest(config, registry, 1, 0, seed=42, index=fx.index_dir if index else None)
    write_manifest(manifest, out)
    return manifest


def _key(d: dict) -> tuple:
    return (d["dataset"], os.path.realpath(d["source_file"]), d["row_group"], d["row_index"])


def test_the_manifest_carries_the_quarantine_of_the_configured_datasets(fx, tmp_path):
    manifest = _plan(fx, tmp_path)
    assert (tmp_path / QUARANTINE_FILE).is_file()
    meta = read_manifest_meta(tmp_path)
    assert meta["inputs"]["index"] == str(fx.index_dir)
    assert meta["quarantine"] == {
        "samples": 4,
        "by_group": {"t2i_pretrain": 2, "unified_edit": 1, "vlm_sft": 1},
        "by_reason": {"caption_invalid": 1, "file_unreadable": 1, "image_corrupt": 1, "image_missing": 1},
    }
    assert "quarantined in the index (skipped unread by training): 4" in format_manifest_table(manifest)
    # planned again without an index: no stale list stays behind
    _plan(fx, tmp_path, index=False)
    assert not (tmp_path / QUARANTINE_FILE).exists() and read_manifest_meta(tmp_path)["quarantine"] is None


def test_an_index_without_a_quarantine_table_gives_its_quarantined_rows(tmp_path):
    fx = small_fixture(tmp_path / "data")  # only index.parquet, one row with status quarantined
    table = read_index_quarantine(fx.index_dir, [("t2i_pretrain", "t2i")])
    assert table.to_pylist() == [
        {
            "dataset": "t2i",
            "group": "t2i_pretrain",
            "task": "t2i",
            "source_file": str(fx.t2i_files[0]),
            "row_group": 0,
            "row_index": 1,
            "reason": "image_corrupt",
        }
    ]
    assert read_index_quarantine(fx.index_dir, [("vlm_sft", "llava")]).num_rows == 0
    with pytest.raises(DataError, match="no index at"):
        read_index_quarantine(tmp_path / "nowhere")


def test_lookup_by_real_path_and_whole_files(tmp_path):
    target = tmp_path / "a.parquet"
    target.write_bytes(b"")
    (tmp_path / "link.parquet").symlink_to(target)
    q = Quarantine([("d", str(target), 0, 3, "image_corrupt"), ("d", str(tmp_path / "gone.jsonl"), -1, -1, "")])
    assert q.reason("d", str(tmp_path / "link.parquet"), 0, 3) == "image_corrupt"
    assert q.reason("d", str(target), 0, 4) is None and q.reason("other", str(target), 0, 3) is None
    assert q.reason("d", str(tmp_path / "gone.jsonl"), -1, 17) == "quarantined"  # a whole file, reason unknown
    assert len(q) == 2


def test_quarantined_rows_are_never_read_nor_decoded_and_are_counted(fx, tmp_path, monkeypatch):
    _plan(fx, tmp_path)
    config_datasets = {("t2i_pretrain", "t2i"), ("unified_edit", "seedx"), ("vlm_sft", "llava")}
    bad = {
        (r["dataset"], os.path.realpath(r["source_file"]), r["row_group"], r["row_index"])
        for r in pq.read_table(fx.index_dir / QUARANTINE_FILE).to_pylist()
        if (r["group"], r["dataset"]) in config_datasets
    }
    bad_files = {k[1] for k in bad if k[2:] == (-1, -1)}
    decoded, read = [], []
    real_decode, real_read = packed_dataset.decode_sample, UnitStream.read_at

    def spy_decode(stream, g, group, pos, record, visit, ids_of, rng, cached=None):
        decoded.append(stream.source(pos))
        return real_decode(stream, g, group, pos, record, visit, ids_of, rng, cached)

    def spy_read(stream, pos):
        read.append(stream.source(pos))
        return real_read(stream, pos)

    monkeypatch.setattr(packed_dataset, "decode_sample", spy_decode)
    monkeypatch.setattr(UnitStream, "read_at", spy_read)
    ds = make_dataset(fx, tmp_path)
    batches = list(itertools.islice(iter(ds), 10))
    assert decoded and read
    for source in decoded + read:
        key = (source[0], os.path.realpath(source[1]), source[2], source[3])
        assert key not in bad and key[1] not in bad_files, key
    packed = [_key(d) for b in batches for d in b["batch_data_indexes"]]
    assert not set(packed) & bad and not {k[1] for k in packed} & bad_files
    quarantined = ds.counters()["quarantined"]
    assert set(quarantined) == {"t2i_pretrain", "unified_edit", "vlm_sft"}
    assert set(quarantined["t2i_pretrain"]) == {"image_corrupt", "caption_invalid"}
    assert set(quarantined["vlm_sft"]) == {"image_missing"}
    assert set(quarantined["unified_edit"]) == {"file_unreadable"}
    assert all(n >= 1 for reasons in quarantined.values() for n in reasons.values())
    # "quarantined" is its own counter: none of these rows shows up as a read or decode failure
    skipped = ds.counters()["skipped"]
    assert not any(r.startswith(("unit unreadable", "image decode")) for reasons in skipped.values() for r in reasons)


def test_an_explicit_index_overrides_and_no_index_keeps_todays_behaviour(fx, tmp_path):
    _plan(fx, tmp_path, index=False)
    assert make_dataset(fx, tmp_path).quarantine is None
    explicit = make_dataset(fx, tmp_path, quarantine=fx.index_dir)
    assert len(explicit.quarantine) == 4
    # a manifest that lists a quarantine whose file went missing is an error naming the fix
    _plan(fx, tmp_path)
    (tmp_path / QUARANTINE_FILE).unlink()
    with pytest.raises(DataError, match="quarantine.parquet is missing; re-run `bagel data plan`"):
        make_dataset(fx, tmp_path)
    meta = json.loads((tmp_path / "manifest.json").read_text())
    assert meta["quarantine"]["samples"] == 4
