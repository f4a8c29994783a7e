"""Exact resume of the packed dataset: N batches, save, rebuild, load, M more == batches N..N+M of an
uninterrupted run (pack boundaries, sample_lens, dropout decisions, timesteps, pixels, state), with
samples sitting in the overflow buffer at the save point, in-process and through a 2-worker DataLoader
(saved in the middle of a worker round), in both packing modes; in ``carry`` mode also with a sample
carried out of the last pack and waiting to open the next one."""

from __future__ import annotations

import dataclasses
import io
import itertools
import warnings

import pytest
import torch
from packed_fixtures import make_dataset, make_manifest, small_fixture
from torch.utils.data import DataLoader

from bagel_core.config.errors import ConfigError
from bagel_core.loader.packed_dataset import collate_packed
from bagel_core.plan.packing import PackingParams

#: Tight packing so samples sit in the overflow buffer at flushes and overflow flushes discard samples.
PARAMS = PackingParams(
    expected_num_tokens=128,
    max_num_tokens=150,
    max_num_tokens_per_sample=160,
    prefer_buffer_before=60,
    max_buffer_size=4,
)
MODES = {"carry": PARAMS, "upstream": dataclasses.replace(PARAMS, mode="upstream")}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    fx = small_fixture(root / "data")
    return fx, make_manifest(fx, root / "m0", num_workers=0), make_manifest(fx, root / "m2", num_workers=2)


def assert_same(a, b, path="batch"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resume_in_process_is_exact_with_a_non_empty_buffer(fx, mode):
    data, m0, _ = fx
    params = MODES[mode]
    reference = list(itertools.islice(iter(make_dataset(data, m0, params=params)), 16))
    with_buffer = [i + 1 for i, b in enumerate(reference[:-6]) if b["data_state"]["buffer"]]
    assert with_buffer, "the small packing params should leave samples in the overflow buffer at a flush"
    n, m = with_buffer[0], 6
    assert any(d["dropped"] for b in reference[n : n + m] for d in b["batch_data_indexes"])  # dropout replayed

    first = make_dataset(data, m0, params=params)
    it = iter(first)
    head = [next(it) for _ in range(n)]
    assert_same(head, reference[:n])
    state = roundtrip(first.state_dict())
    assert state["workers"][0]["buffer"] and state["batches"] == n and state["packing"] == mode
    # upstream-shaped data_status: {group: {worker_id: cursor}} with 13's cursor formats
    status = state["data_status"]
    assert len(status["t2i_pretrain"][0]) == 3 and len(status["unified_edit"][0]) == 2
    assert isinstance(status["vlm_sft"][0], int)

    resumed = make_dataset(data, m0, params=params)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), m))
    assert_same(tail, reference[n : n + m])
    assert resumed.counters() == reference[n + m - 1]["data_state"]["counters"]


def _carried(batch) -> int:
    return sum(batch["data_state"]["counters"]["carried"].values())


def test_resume_is_exact_with_a_carried_sample_pending(fx):
    """carry: the save falls right after a pack that an overflowing sample ended; that sample waits at
    the buffer's front (saved as a reference) and must open the first pack after the resume."""
    data, m0, _ = fx
    params = PackingParams(128, 150, 150, 1000, 50)  # the recipe pattern: a buffered sample comes straight back
    reference = list(itertools.islice(iter(make_dataset(data, m0, params=params)), 14))
    carried_at = [i + 1 for i in range(1, len(reference) - 4) if _carried(reference[i]) > _carried(reference[i - 1])]
    assert carried_at, "the recipe pattern should carry a sample out of some pack"
    n, m = carried_at[0], 4
    pending = reference[n - 1]["data_state"]["buffer"]
    assert len(pending) == 1  # prefer_buffer_before > max_num_tokens: only the carried sample waits

    first = make_dataset(data, m0, params=params)
    assert_same(list(itertools.islice(iter(first), n)), reference[:n])
    state = roundtrip(first.state_dict())
    assert state["workers"][0]["buffer"] == pending
    resumed = make_dataset(data, m0, params=params)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), m))
    assert_same(tail, reference[n : n + m])
    opener = tail[0]["batch_data_indexes"][2]  # after the two mandatory samples
    assert opener["dataset_name"] == pending[0]["group"]


def test_resume_refuses_another_packing_mode(fx):
    data, m0, _ = fx
    ds = make_dataset(data, m0, params=MODES["carry"])
    list(itertools.islice(iter(ds), 2))
    state = ds.state_dict()
    with pytest.raises(ConfigError, match="packed with --packing carry, this run packs with --packing upstream"):
        make_dataset(data, m0, params=MODES["upstream"]).load_state_dict(state)
    # a state saved before the modes existed was packed the upstream way
    old = {**state, "workers": {0: {k: v for k, v in state["workers"][0].items() if k != "packing"}}}
    old.pop("packing")
    upstream = make_dataset(data, m0, params=MODES["upstream"])
    upstream.load_state_dict(old)  # accepted at the dataset level ...
    with pytest.raises(ConfigError, match="--packing upstream, this run packs with --packing carry"):
        make_dataset(data, m0, params=MODES["carry"]).load_state_dict(old)


def test_iterating_again_continues_after_the_last_recorded_batch(fx):
    data, m0, _ = fx
    reference = list(itertools.islice(iter(make_dataset(data, m0, params=PARAMS)), 5))
    ds = make_dataset(data, m0, params=PARAMS)
    assert_same(list(itertools.islice(iter(ds), 2)), reference[:2])
    assert_same(list(itertools.islice(iter(ds), 3)), reference[2:5])


def _take(loader, ds, count, record=True):
    out = []
    for batch in loader:
        state = batch["data_state"]
        if record:
            ds.record(batch)  # pops data_state: the training loop trains on the batch now
            batch["data_state"] = state
        out.append(batch)
        if len(out) == count:
            break
    return out


def _loader(ds):
    return DataLoader(ds, batch_size=None, num_workers=2, collate_fn=collate_packed)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resume_through_two_dataloader_workers_mid_round(fx, mode):
    data, _, m2 = fx
    params = MODES[mode]
    n, m = 3, 5  # n odd: the save falls between worker 0's and worker 1's turn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        a = make_dataset(data, m2, num_workers=2, params=params)
        reference = _take(_loader(a), a, n + m, record=False)
        assert [b["data_state"]["worker_id"] for b in reference] == [0, 1, 0, 1, 0, 1, 0, 1]
        b = make_dataset(data, m2, num_workers=2, params=params)
        head = _take(_loader(b), b, n)  # the DataLoader has prefetched more than n: those are not consumed
        state = roundtrip(b.state_dict())
        assert state["next_worker"] == 1 and set(state["workers"]) == {0, 1}
        assert set(state["data_status"]["t2i_pretrain"]) == {0, 1}
        c = make_dataset(data, m2, num_workers=2, params=params)
        c.load_state_dict(state)
        tail = _take(_loader(c), c, m)
    assert_same(head, reference[:n])
    assert_same(tail, reference[n:])
    assert c.state_dict()["next_worker"] == (reference[-1]["data_state"]["worker_id"] + 1) % 2


def test_resume_refuses_a_different_seed_or_topology(fx):
    data, m0, _ = fx
    ds = make_dataset(data, m0, params=PARAMS)
    list(itertools.islice(iter(ds), 2))
    state = ds.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        make_dataset(data, m0, seed=1, params=PARAMS).load_state_dict(state)
    bad = dict(state, num_workers=2)
    with pytest.raises(ConfigError, match="num_workers"):
        make_dataset(data, m0, params=PARAMS).load_state_dict(bad)


def test_pack_events_uses_a_caller_owned_buffer():
    """The ``buffer`` argument added to ``pack_events`` for exact resume: contents are used (oldest first)
    and the caller sees every change."""
    import random
    from collections import deque

    from bagel_core.plan.packing import Buffered, Flush, Packed, pack_events

    params = PackingParams(
        expected_num_tokens=10,
        max_num_tokens=12,
        max_num_tokens_per_sample=12,
        prefer_buffer_before=5,
        max_buffer_size=2,
    )
    fresh = iter(range(100, 1000))
    buffer = deque([("b0", 0), ("b1", 0)])
    events = pack_events(
        params, [1.0], [False], lambda g: f"s{next(fresh)}", lambda s: 4, lambda s: 4, random.Random(0), buffer=buffer
    )
    first = [next(events) for _ in range(2)]
    assert [(type(e), e.sample, e.from_buffer) for e in first] == [(Packed, "b0", True), (Packed, "b1", True)]
    assert not buffer
    rest = list(itertools.islice(events, 3))
    assert isinstance(rest[0], Packed) and not rest[0].from_buffer and isinstance(rest[1], Flush)
    # a sample that does not fit is appended to the caller's deque
    events = pack_events(
        params, [1.0], [False], lambda g: "big", lambda s: 8, lambda s: 8, random.Random(0), buffer=buffer
    )
    assert isinstance(next(events), Packed) and isinstance(next(events), Buffered) and list(buffer) == [("big", 0)]


def test_resume_refuses_a_state_from_another_manifest(fx, tmp_path):
    data, m0, _ = fx
    ds = make_dataset(data, m0, params=PARAMS)
    list(itertools.islice(iter(ds), 2))
    other = make_manifest(data, tmp_path / "other", seed=7)  # a different shuffle of the same units
    resumed = make_dataset(data, other, params=PARAMS)
    resumed.load_state_dict(ds.state_dict())
    with pytest.raises(ConfigError, match="different unit list"):
        next(iter(resumed))


def test_resume_data_status_false_restarts_only_that_group(fx, tmp_path):
    import yaml

    data, m0, _ = fx
    raw = yaml.safe_load(data.groups.read_text())
    raw["vlm_sft"]["resume_data_status"] = False
    groups = tmp_path / "groups.yaml"
    groups.write_text(yaml.safe_dump(raw, sort_keys=False))
    ds = make_dataset(data, m0, groups=groups, params=PARAMS)
    list(itertools.islice(iter(ds), 3))
    state = ds.state_dict()
    assert state["workers"][0]["streams"]["vlm_sft"]["position"] != [0, 0, 0]
    resumed = make_dataset(data, m0, groups=groups, params=PARAMS)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    first_vlm = next(d for d in batch["batch_data_indexes"] if d["dataset_name"] == "vlm_sft")
    first_t2i = next(d for d in batch["batch_data_indexes"] if d["dataset_name"] == "t2i_pretrain")
    assert first_vlm["data_indexes"] == 0  # restarted
    t2i_next = state["workers"][0]["streams"]["t2i_pretrain"]["position"]
    assert first_t2i["data_indexes"] == t2i_next  # continued
