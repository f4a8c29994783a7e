"""Sampling manifest: upstream's split rule, determinism, exactly-once assignment, the empty-worker error."""

from __future__ import annotations

import json
import random
from collections import Counter

import polars as pl
import pytest
from stats_fixtures import write_fixture

from bagel_core.cli import main as bagel_main
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.plan.manifest import (
    ManifestCapacityError,
    build_manifest,
    read_manifest,
    read_manifest_meta,
    write_manifest,
)
from bagel_core.plan.sharding import (
    DataUnit,
    capacity_problem,
    list_group_units,
    rank_slice,
    shuffled_units,
    worker_slice,
)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_fixture(
        tmp_path_factory.mktemp("man"),
        t2i_files=5,
        edit_files=3,
        edit_row_groups=2,
        vlm_copies=6,
        t2i_num_used=12,
        vlm_num_used=22,
    )


def _load(fx):
    return load_dataset_config(fx.groups), Registry.load(fx.registry)


def test_manifest_is_deterministic(fx, tmp_path):
    config, registry = _load(fx)
    a = build_manifest(config, registry, 2, 3, seed=7)
    b = build_manifest(config, registry, 2, 3, seed=7)
    assert a.assignments == b.assignments
    write_manifest(a, tmp_path / "a")
    write_manifest(b, tmp_path / "b")
    for name in ("manifest.parquet", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = build_manifest(config, registry, 2, 3, seed=8)
    assert c.assignments != a.assignments


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 1), (2, 2), (3, 1), (2, 3)])
def test_every_unit_assigned_at_most_once_per_epoch(fx, world_size, num_workers):
    config, registry = _load(fx)
    manifest = build_manifest(config, registry, world_size, num_workers, seed=42)
    for name, group in config.groups.items():
        listed = Counter(list_group_units(group, registry).units)
        assigned = Counter(u for (g, _, _), units in manifest.assignments.items() if g == name for u in units)
        assert not assigned - listed, "a unit was assigned more often than it is listed"
        info = manifest.groups[name]
        dropped = info["dropped_at_rank_level"] + info["dropped_at_worker_level"]
        assert sum(assigned.values()) == sum(listed.values()) - dropped
        assert sum(assigned.values()) == world_size * max(num_workers, 1) * info["per_worker"]
        # positions: no (rank, worker) list shares a unit occurrence with another beyond its listed multiplicity
        per_slot = [Counter(units) for (g, _, _), units in manifest.assignments.items() if g == name]
        assert sum(per_slot, Counter()) == assigned


def test_t2i_num_used_repeats_files_and_vlm_truncates(fx):
    config, registry = _load(fx)
    t2i = list_group_units(config.groups["t2i_pretrain"], registry)
    assert len(t2i.units) == 12 and len(set(t2i.units)) == 5
    assert Counter(Counter(t2i.units).values()) == Counter({3: 2, 2: 3})  # 5 files x2 + the first 2 again
    assert any("repeated" in n for n in t2i.notes)
    vlm = list_group_units(config.groups["vlm_sft"], registry)
    lines = fx.jsonl.read_text().splitlines(keepends=True)
    order = list(range(len(lines)))
    rng = random.Random()
    rng.seed(0)
    rng.shuffle(order)
    assert [u.line for u in vlm.units] == order[:22]
    assert all(u.sort_key == (lines[u.line], str(fx.root / "vlm" / "images")) for u in vlm.units)
    edit = list_group_units(config.groups["unified_edit"], registry)
    assert len(edit.units) == 3 * 2 and {u.row_group for u in edit.units} == {0, 1}


def test_split_follows_upstream_rule():
    """Sort, Random(seed).shuffle, rank slices with the remainder dropped, worker slices reversed."""
    units = [
        DataUnit("t2i_pretrain", "t2i", f"/d/chunk_{i}.parquet", sort_key=(f"/d/chunk_{i}.parquet",))
        for i in (3, 1, 10, 0, 2, 7, 5, 4, 9, 8, 6)
    ]
    expected = sorted(units, key=lambda u: u.source_file)
    random.Random(5).shuffle(expected)
    got = shuffled_units(units, 5)
    assert got == expected
    assert rank_slice(got, 2, 1) == expected[5:10]  # 11 // 2 = 5; unit 10 dropped
    assert worker_slice(expected[5:10], 2, 0) == [expected[6], expected[5]]
    assert worker_slice(expected[5:10], 2, 1) == [expected[8], expected[7]]
    assert worker_slice(expected[5:10], 0, 0) == expected[5:10]


def test_reference_worked_examples():
    """data-format.md 12.3 table (8 ranks)."""
    assert capacity_problem("t2i_pretrain", "t2i", 10, 8, 1) is None
    assert "0 per worker" in capacity_problem("t2i_pretrain", "t2i", 10, 8, 4)
    edit = [
        DataUnit(
            "unified_edit", "e", f"/e/c{i // 10}.parquet", row_group=i % 10, sort_key=(f"/e/c{i // 10}.parquet", i % 10)
        )
        for i in range(100)
    ]
    ranks = [rank_slice(shuffled_units(edit, 42), 8, r) for r in range(8)]
    assert {len(r) for r in ranks} == {12} and 100 - 8 * 12 == 4
    assert {len(worker_slice(ranks[0], 4, w)) for w in range(4)} == {3}


def test_empty_worker_is_an_error_before_launch(fx, tmp_path, capsys):
    config, registry = _load(fx)
    with pytest.raises(ManifestCapacityError) as err:
        build_manifest(config, registry, world_size=4, num_workers=2)
    message = str(err.value)
    assert "unified_edit: 6 row groups for world_size 4 x num_workers 2 = 8 readers" in message
    assert "Fix:" in message and "t2i_pretrain" not in message  # 12 files suffice
    rc = bagel_main(
        [
            "data",
            "plan",
            "--registry",
            str(fx.registry),
            "--dataset-config",
            str(fx.groups),
            "--index",
            str(fx.index_dir),
            "--out",
            str(tmp_path / "p"),
            "--world-size",
            "4",
            "--num-workers",
            "2",
        ]
    )
    assert rc == 2 and "unified_edit" in capsys.readouterr().err
    assert not (tmp_path / "p" / "manifest.parquet").exists()
    # non-strict (Dagster) writes it with the problems recorded; the loader's reader refuses it
    manifest = build_manifest(config, registry, 4, 2, strict=False)
    write_manifest(manifest, tmp_path / "q")
    assert read_manifest_meta(tmp_path / "q")["ok"] is False
    with pytest.raises(ManifestCapacityError):
        read_manifest(tmp_path / "q", 0, 0)


def test_reader_returns_worker_units_in_order(fx, tmp_path):
    config, registry = _load(fx)
    manifest = build_manifest(config, registry, 2, 2, seed=3)
    write_manifest(manifest, tmp_path)
    for rank in range(2):
        for worker in range(2):
            got = read_manifest(tmp_path, rank, worker, world_size=2, num_workers=2)
            for group in config.groups:
                assert got[group] == manifest.assignments[(group, rank, worker)]
    with pytest.raises(ValueError, match="num_workers=2"):
        read_manifest(tmp_path, 0, 0, num_workers=4)
    frame = pl.read_parquet(tmp_path / "manifest.parquet")
    assert set(frame.columns) >= {"group", "dataset", "rank", "worker", "position", "source_file", "row_group", "line"}
    meta = json.loads((tmp_path / "manifest.json").read_text())
    assert meta["groups"]["vlm_sft"]["units"] == 22 and meta["ok"] is True


def test_file_missing_from_parquet_info_is_dropped_and_reported(fx, tmp_path):
    config, registry = _load(fx)
    entry = registry.get("unified_edit", "seedx")
    info = json.loads(entry.parquet_info_path.read_text())
    info.pop(min(info))
    patched = tmp_path / "info.json"
    patched.write_text(json.dumps(info))
    text = fx.registry.read_text().replace(str(entry.parquet_info_path), str(patched))
    (tmp_path / "reg.yaml").write_text(text)
    listing = list_group_units(config.groups["unified_edit"], Registry.load(tmp_path / "reg.yaml"))
    assert len(listing.units) == 4
    assert any("not in parquet_info" in n for n in listing.notes)
