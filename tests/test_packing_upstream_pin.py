"""``--packing upstream`` stays bit-identical to the packer before the ``carry`` mode existed.

The digests below were taken from the code *before* the packing modes were added: over the decision
stream of :func:`pack_events` on seeded token counts, over the simulation of the stats fixture, and over
the first packs of the real :class:`PackedDataset` (sample order, lengths, CFG drops, timesteps, every
index and id tensor; image tensors by shape only, so a Pillow resampling change does not move them).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random

import polars as pl
import pytest
import torch
from packed_fixtures import make_dataset, make_manifest, small_fixture
from stats_fixtures import write_fixture

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.plan.manifest import build_manifest, simulate_packing
from bagel_core.plan.packing import Buffered, Flush, Packed, PackingParams, Skipped, pack_events
from bagel_core.stats.token_stats import compute_token_stats

#: Upstream mode, explicitly (the default is ``carry``).
UPSTREAM = {"mode": "upstream"}

#: Tight (resume tests), recipe-like (prefer_buffer_before > max_num_tokens: the discard habit) and loose.
DATASET_PARAMS = {
    "tight": PackingParams(128, 150, 160, 60, 4),
    "recipe": PackingParams(128, 150, 150, 1000, 50),
    "loose": PackingParams(128, 192, 160, 96, 4),
}


def _upstream(params: PackingParams) -> PackingParams:
    fields = {k: getattr(params, k) for k in params.__dataclass_fields__}
    return PackingParams(**{**fields, **UPSTREAM}) if "mode" in fields else params


def event_digest(events) -> str:
    digest = hashlib.sha256()
    for e in events:
        if isinstance(e, Packed):
            row = ("P", e.sample, e.group, e.tokens, e.mandatory, e.from_buffer)
        elif isinstance(e, Skipped):
            row = ("S", e.sample, e.group, e.mandatory)
        elif isinstance(e, Buffered):
            row = ("B", e.sample, e.group)
        else:
            assert isinstance(e, Flush), f"upstream mode yielded {type(e).__name__}"
            row = ("F", e.length, e.num_samples, e.overflow, e.discarded, e.discarded_group, e.discarded_from_buffer)
        digest.update(repr(row).encode())
    return digest.hexdigest()


def _stream_events(params: PackingParams, n: int, seed: int):
    draw = random.Random(seed)
    sizes = {0: (20, 70), 1: (40, 160), 2: (5, 60)}
    counters = itertools.count()

    def next_sample(g: int) -> tuple[int, int, int]:
        lo, hi = sizes[g]
        return (g, next(counters), draw.randint(lo, hi))

    return list(
        itertools.islice(
            pack_events(
                _upstream(params),
                [1.0, 2.0, 1.0],
                [True, False, False],
                next_sample,
                lambda s: s[2],
                lambda s: s[2] - (s[1] % 3),
                random.Random(seed + 1),
            ),
            n,
        )
    )


STREAM_DIGESTS = {
    "tight": "768a5d2a5ac7cce7c373ef4c551b8352d3fc30186b7af866b53a106e2f6632ac",
    "recipe": "09e75c7fdedb42111f699ea65c3b9e03c32a7f5b353e2e8b533ddc4bbb51a020",
    "loose": "d9dd2a11019d090307eac7a5fefad083ceab62e8b1e075ed9c42dfb94a030e8f",
}


@pytest.mark.parametrize("name", sorted(STREAM_DIGESTS))
def test_upstream_event_stream_is_unchanged(name):
    params = {
        "tight": PackingParams(200, 240, 150, 60, 3),
        "recipe": PackingParams(200, 230, 200, 1000, 50),
        "loose": PackingParams(300, 400, 150, 200, 6),
    }[name]
    events = _stream_events(params, 3000, seed=7)
    kinds = {type(e).__name__ for e in events}
    assert {"Packed", "Flush", "Buffered"} <= kinds
    assert event_digest(events) == STREAM_DIGESTS[name]


def test_upstream_simulation_is_unchanged(tmp_path):
    fx = write_fixture(tmp_path, t2i_files=3, edit_files=2, vlm_copies=4)
    config, registry = load_dataset_config(fx.groups), Registry.load(fx.registry)
    stats = compute_token_stats(registry, config, fx.index_dir, tmp_path / "stats")
    manifest = build_manifest(config, registry, 1, 2, seed=42)
    params = _upstream(PackingParams(10_240, 11_520, 10_240, 16_384, 50))
    report = simulate_packing(manifest, config, pl.read_parquet(stats.stats_path), params)
    figures = (
        report.pack_lengths,
        report.overflow_flushes,
        report.skipped_over_cap,
        report.discarded_on_overflow,
        report.buffered,
        [(g["group"], g["tokens"], g["samples"]) for g in report.group_share],
        [(w["packs"], w["packed_samples"], w["max_buffer"], w["first_pass_pack"]) for w in report.workers],
    )
    assert hashlib.sha256(repr(figures).encode()).hexdigest() == (
        "14354b2ad1a2ab817ac22a9b2441da52dcf7926e3fd7992fc188de0a2a3c26b8"
    )


def batch_digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if key == "data_state":
                continue
            if key == "batch_data_indexes":
                value = [
                    (
                        d["dataset_name"],
                        d["dataset"],
                        os.path.basename(d["source_file"]),
                        d["row_group"],
                        d["row_index"],
                        d["data_indexes"],
                        d["num_tokens"],
                        d["est_tokens"],
                        d["dropped"],
                    )
                    for d in value
                ]
            elif key in ("padded_images", "packed_vit_tokens"):
                value = tuple(value.shape)
            elif isinstance(value, torch.Tensor):
                value = (str(value.dtype), tuple(value.shape), value.tolist())
            digest.update(repr((key, value)).encode())
    counters = batches[-1]["data_state"]["counters"]
    old = ("skipped", "packed", "buffered", "discarded_on_overflow", "empty_flushes")
    digest.update(repr({k: counters[k] for k in old}).encode())
    return digest.hexdigest()


DATASET_DIGESTS = {
    "tight": "349184e8e93d97bf2bf919bc297e3e0f98cbcc6ce946621623af31b7a8a8b70e",
    "recipe": "531d455d29d7be4415f61c02ae2a9987b7cf0f780c84475ff532e0c6c4b6caa8",
    "loose": "ff86f81bd9229fc7e0235dc26fdb3019f06b3429e61c423b8a7c302fb410caec",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pin")
    fx = small_fixture(root / "data")
    return fx, make_manifest(fx, root / "manifest")


@pytest.mark.parametrize("name", sorted(DATASET_DIGESTS))
def test_upstream_packed_dataset_is_unchanged(data, name):
    fx, manifest = data
    ds = make_dataset(fx, manifest, params=_upstream(DATASET_PARAMS[name]))
    batches = list(itertools.islice(iter(ds), 12))
    assert batch_digest(batches) == DATASET_DIGESTS[name]
