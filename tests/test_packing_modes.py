"""The ``carry`` packing mode (no sample read is thrown away) against ``upstream``: the decision loop on
hand-made token counts, its caller-owned state, and what the simulation reports per group."""

from __future__ import annotations

import itertools
import random
from collections import deque

import polars as pl
import pytest
from stats_fixtures import write_fixture

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import Registry
from bagel_core.plan.manifest import build_manifest, format_packing_table, simulate_packing, skew_warnings
from bagel_core.plan.packing import (
    TERMINAL_FATES,
    Buffered,
    Flush,
    Packed,
    PackingParams,
    Skipped,
    Unfit,
    pack_events,
)
from bagel_core.stats.token_stats import compute_token_stats


def kinds(events):
    """Samples are ints (estimate = real length); M marks a mandatory sample, U an unfit one."""
    out = []
    for e in events:
        if isinstance(e, Packed):
            out.append(("M" if e.mandatory else "P", e.sample))
        elif isinstance(e, Skipped):
            out.append(("S", e.sample))
        elif isinstance(e, Buffered):
            out.append(("B", e.sample))
        elif isinstance(e, Unfit):
            out.append(("U", e.sample))
        else:
            out.append(("F", e.length, e.overflow, e.discarded, e.carried))
    return out


def run(params, weights, mandatory, streams, n_events, buffer=None):
    iters = [iter(s) for s in streams]
    events = pack_events(
        params,
        weights,
        mandatory,
        lambda g: next(iters[g]),
        lambda s: s,
        lambda s: s,
        random.Random(0),
        buffer=buffer,
    )
    return list(itertools.islice(events, n_events))


def test_carry_is_the_default_and_modes_are_checked():
    assert PackingParams().mode == "carry"
    with pytest.raises(ValueError, match="packing mode 'keep' is unknown: use one of carry, upstream"):
        PackingParams(mode="keep")


def test_carry_opens_the_next_pack_with_the_sample_upstream_discards():
    """The fine-tune recipe pattern (prefer_buffer_before > max_num_tokens)."""
    stream = [60, 50, 30, 20]
    upstream = PackingParams(100, 105, 100, 200, 50, mode="upstream")
    assert kinds(run(upstream, [1], [False], [stream], 5)) == [
        ("P", 60),
        ("B", 50),
        ("F", 60, True, 50, None),  # popped back, overflows again: discarded
        ("P", 30),
        ("P", 20),
    ]
    carry = PackingParams(100, 105, 100, 200, 50)
    events = run(carry, [1], [False], [stream], 7)
    assert kinds(events) == [
        ("P", 60),
        ("B", 50),
        ("F", 60, True, None, 50),  # the pack is yielded, 50 is carried ...
        ("P", 50),  # ... and opens the next pack
        ("P", 30),
        ("P", 20),
        ("F", 100, False, None, None),
    ]
    assert events[2].carried_from_buffer and events[3].from_buffer


def test_carry_with_a_full_buffer_puts_the_fresh_sample_in_front():
    params = PackingParams(100, 100, 100, 50, 1)
    buffer: deque = deque()
    events = run(params, [1], [False], [[70, 40, 45, 20, 10, 5]], 9, buffer=buffer)
    assert kinds(events) == [
        ("P", 70),
        ("B", 40),  # 110 > 100, the buffer has room
        ("F", 70, True, None, 45),  # buffer full: upstream would discard the fresh 45
        ("P", 45),  # the carried sample opens the pack, before the older buffered 40
        ("P", 40),  # curr 45 < prefer_buffer_before 50: the buffer's oldest
        ("B", 20),
        ("P", 10),
        ("P", 5),
        ("F", 100, False, None, None),
    ]
    assert not events[2].carried_from_buffer and list(buffer) == [(20, 0)]


def test_a_sample_that_fits_beside_no_mandatory_fill_is_skipped_not_carried_forever():
    params = PackingParams(expected_num_tokens=90, max_num_tokens=100, max_num_tokens_per_sample=100,
                           prefer_buffer_before=1000, max_buffer_size=5)  # fmt: skip
    mandatory = [30] * 10
    events = run(params, [0, 1], [True, False], [mandatory, [60, 50, 75, 40, 20]], 12)
    assert kinds(events) == [
        ("M", 30),
        ("P", 60),
        ("F", 90, False, None, None),
        ("M", 30),
        ("P", 50),
        ("B", 75),
        ("F", 80, True, None, 75),  # carried ...
        ("M", 30),
        ("U", 75),  # ... but 30 + 75 > 100: it fits beside no mandatory sample; skipped, the pack goes on
        ("P", 40),
        ("P", 20),
        ("F", 90, False, None, None),
    ]
    unfit = events[8]
    assert unfit.from_buffer and unfit.length == 30 and unfit.estimate == 75
    # with no mandatory group a sample over max_num_tokens (cap above it) is unfit too: no empty flushes
    loose = PackingParams(50, 60, 100, 0, 4)
    assert kinds(run(loose, [1], [False], [[70, 30, 30]], 4)) == [
        ("U", 70),
        ("P", 30),
        ("P", 30),
        ("F", 60, False, None, None),
    ]


def test_carry_never_exceeds_max_num_tokens_and_loses_nothing():
    params = PackingParams(200, 230, 200, 1000, 50)
    draw = random.Random(3)
    streams = [[draw.randint(20, 70) for _ in range(400)], [draw.randint(40, 200) for _ in range(400)]]
    events = run(params, [1, 2], [True, False], streams, 600)
    curr = 0
    for e in events:
        if isinstance(e, Packed):
            curr += e.tokens
        elif isinstance(e, Flush):
            assert curr == e.length <= 230
            assert e.discarded is None
            curr = 0
    assert any(isinstance(e, Flush) and e.carried is not None for e in events)


def test_restarting_at_a_carry_flush_with_the_saved_buffer_and_rng_continues_exactly():
    """What the packed dataset's exact resume relies on: at a Flush the caller's buffer (carried sample
    in front) and the RNG are the whole packer state."""
    params = PackingParams(100, 105, 100, 200, 3)
    sizes = random.Random(5)
    data = [[sizes.randint(10, 40) for _ in range(500)], [sizes.randint(30, 90) for _ in range(500)]]
    positions = [0, 0]

    def next_sample(g):
        positions[g] += 1
        return (g, positions[g] - 1, data[g][positions[g] - 1])

    def events(buffer, rng):
        return pack_events(params, [1, 1], [True, False], next_sample, lambda s: s[2], lambda s: s[2], rng, buffer)

    buffer, rng = deque(), random.Random(9)
    stream = events(buffer, rng)
    head = []
    for e in stream:
        head.append(e)
        if isinstance(e, Flush) and e.carried is not None and len(head) > 20:
            break
    saved = (deque(buffer), rng.getstate(), list(positions))
    assert saved[0][0][0] == head[-1].carried  # the carried sample is the buffer's front
    reference = list(itertools.islice(stream, 200))
    positions[:] = saved[2]
    resumed_rng = random.Random()
    resumed_rng.setstate(saved[1])
    resumed = list(itertools.islice(events(deque(saved[0]), resumed_rng), 200))
    assert kinds(resumed) == kinds(reference)


# ---- the simulation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modes")
    fx = write_fixture(tmp, t2i_files=3, edit_files=2, vlm_copies=4)
    config, registry = load_dataset_config(fx.groups), Registry.load(fx.registry)
    stats = compute_token_stats(registry, config, fx.index_dir, tmp / "stats")
    return config, build_manifest(config, registry, 1, 2, seed=42), pl.read_parquet(stats.stats_path)


@pytest.mark.parametrize("mode", ["carry", "upstream"])
def test_simulation_accounts_for_every_sample_drawn(planned, mode):
    config, manifest, frame = planned
    report = simulate_packing(manifest, config, frame, PackingParams(10_240, 11_520, 10_240, 16_384, 50, mode=mode))
    assert report.mode == mode and report.params["mode"] == mode
    for g in report.group_share:
        assert g["drawn"] == sum(g[fate] for fate in TERMINAL_FATES), g
        assert g["samples"] == g["packed"]
    assert abs(sum(g["drawn_share"] for g in report.group_share) - 1) < 1e-9
    assert abs(sum(g["trained_share"] for g in report.group_share) - 1) < 1e-9
    if mode == "carry":
        assert report.discarded_on_overflow == 0 and report.carried == report.overflow_flushes > 0
        assert all(g["discarded_on_flush"] == 0 for g in report.group_share)
    else:
        assert report.carried == report.skipped_unfit == 0 and report.discarded_on_overflow > 0
    assert report.max_length <= 11_520 or mode == "upstream"
    table = format_packing_table(report)
    assert f"--packing {mode}" in table and "drawn n" in table and "trained n" in table


def test_manifest_records_the_packing_mode(planned, tmp_path):
    from bagel_core.plan.manifest import read_manifest_meta, write_manifest

    config, manifest, _ = planned
    write_manifest(manifest, tmp_path)
    assert read_manifest_meta(tmp_path)["packing"] == "carry"
    registry = Registry.load(config.source.parent / "dataset_info.yaml")
    upstream = build_manifest(config, registry, 1, 2, seed=42, packing="upstream")
    assert upstream.assignments == manifest.assignments  # the data each worker reads does not depend on it
    write_manifest(upstream, tmp_path)
    assert read_manifest_meta(tmp_path)["packing"] == "upstream"
    with pytest.raises(ConfigError, match="packing mode 'drop' is unknown"):
        build_manifest(config, registry, 1, 2, packing="drop")


def test_skew_warning_names_the_discards(planned):
    config, manifest, frame = planned
    report = simulate_packing(manifest, config, frame, PackingParams(10_240, 11_520, 10_240, 16_384, 50, "upstream"))
    row = {
        **report.group_share[1],
        "drawn": 100,
        "drawn_share": 0.3,
        "trained_share": 0.2,
        "discarded_on_flush": 30,
        "skipped_over_cap": 1,
        "unfit": 0,
    }
    report.group_share = [row]
    (warning,) = skew_warnings(report)
    assert "drawn for 30.0% of the samples but trained on 20.0% (30 discarded on flush, 1 skipped over cap)" in warning
    assert "--packing carry" in warning


# ---- the example format with the seed guides' budgets ------------------------------------------------------
SEED_BUDGETS = (10_240, 11_520, 10_240, 16_384, 50)  # expected / max / per-sample cap (guide 001, 4.1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The built-in example (same generator as ``bagel data download --source builtin``), indexed and counted,
    planned for one rank and one worker as in the fine-tune guide."""
    from bagel_core.config.discover import default_dataset_config, discover_registry
    from bagel_core.data.example_generator import write_example_dataset
    from bagel_core.index.indexer import IndexOptions, index_registry

    tmp = tmp_path_factory.mktemp("example")
    root = write_example_dataset(tmp)
    registry = discover_registry(root, parquet_info_dir=tmp / "reg" / "parquet_info")
    registry.source = tmp / "reg" / "dataset_info.yaml"
    registry.save(registry.source)
    index_registry(registry, tmp / "index", IndexOptions(workers=1))
    registry = Registry.load(registry.source)
    config = default_dataset_config(registry)
    stats = compute_token_stats(registry, config, tmp / "index", tmp / "stats", max_num_tokens_per_sample=10_240)
    return config, build_manifest(config, registry, 1, 1, seed=42), pl.read_parquet(stats.stats_path)


def test_example_format_carry_trains_what_it_draws_and_upstream_shows_the_skew(example):
    config, manifest, frame = example
    carry = simulate_packing(manifest, config, frame, PackingParams(*SEED_BUDGETS, mode="carry"))
    upstream = simulate_packing(manifest, config, frame, PackingParams(*SEED_BUDGETS, mode="upstream"))
    print(format_packing_table(carry), format_packing_table(upstream), sep="\n\n")
    # carry: nothing read is discarded, every group trains at the share it is drawn
    assert carry.discarded_on_overflow == 0 and carry.carried > 0
    lost = carry.skipped_over_cap + carry.skipped_unfit
    assert lost <= 0.01 * sum(g["drawn"] for g in carry.group_share)
    for g in carry.group_share:
        assert g["trained_share"] == pytest.approx(g["drawn_share"], rel=0.05), g
    assert not skew_warnings(carry)
    assert carry.max_length <= 11_520
    # upstream: about one sample per overflow flush is thrown away, mostly editing samples
    edit = next(g for g in upstream.group_share if g["group"] == "unified_edit")
    assert upstream.discarded_on_overflow == upstream.overflow_flushes > 0
    assert edit["discarded_on_flush"] > upstream.discarded_on_overflow / 2
    assert edit["trained_share"] < 0.85 * edit["drawn_share"]
    assert any(w.startswith("WARNING: unified_edit") for w in skew_warnings(upstream))


def test_simulation_stops_when_the_mandatory_fill_leaves_room_for_nothing():
    """carry: mandatory samples of 90 tokens under max_num_tokens 100 leave no room for any 20-token
    sample; every candidate is unfit, no pack is ever yielded, and the simulation says so instead of
    looping forever."""
    from bagel_core.plan.packing import SimSample, simulate_worker

    params = PackingParams(100, 100, 100, 0, 4)
    big = [SimSample("m", ("m", i), (1.0,), (90,), (90,)) for i in range(3)]
    small = [SimSample("s", ("s", i), (1.0,), (20,), (20,)) for i in range(5)]
    r = simulate_worker(params, ["m", "s"], [1, 1], [True, False], [big, small], seed=0)
    assert r.stalled and r.truncated and not r.pack_lengths
    assert r.fates_by_group["s"]["unfit"] == r.fates_by_group["s"]["drawn"] > 0
