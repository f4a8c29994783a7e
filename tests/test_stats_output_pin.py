"""Pins the *values* ``compute_token_stats`` writes, so speed work on the statistics cannot change them.

Why: the statistics feed the packing simulation, the sampling manifest and the user's go/no-go before
a launch; an optimisation that silently moved one count would be invisible to the other tests, which
check hand-picked samples. Here every column of ``token_stats.parquet``, every skipped row with its
reason, the summary parquet and the summary JSON of a varied dataset are reduced to one SHA-256
digest. The digests below were computed with the implementation as it stood before the
"statistics at tokenizer speed" rewrite (issue #13, item 5); a change of any value fails the test.

The dataset is the shared ``stats_fixtures`` one plus seeded synthetic rows that hit every branch of
the counting rules: T2I captions with 0..4 values (duplicates, empty and non-ASCII strings, invalid
JSON, non-objects, non-string values, nulls), edit rows of 1..6 images with 1..3 alternatives per step
(mismatched lists, null and empty entries), VLM records with 0..4 images, several ``<image>`` tags per
turn, surplus images, empty answers, ignored roles, video records and unparsable lines, image sizes
from tiny to far over the latent table, and an index row of a dataset the config does not use. The
statistics never open images, so the synthetic rows carry empty image bytes and their sizes live in
the index only.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stats_fixtures import _row, write_fixture, write_index

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.sequence.tokens import VIT_MAX_PATCHES_PER_SIDE, SampleRejected, summarise_variants
from bagel_core.stats.token_stats import (
    SKIPPED_FILE,
    STATS_FILE,
    SUMMARY_FILE,
    SUMMARY_JSON,
    compute_token_stats,
    format_summary_table,
    iter_samples,
    load_index,
    sample_variants,
)

#: Digests of (stats, skipped, summary parquet, summary JSON) per run below, from the pre-rewrite code.
PINNED = {
    "default_caps": "85ced4299d8998c62c55fa8e67b612bf30b7c95cf1e78b402c29f3fd12d83ab3",
    "small_caps": "3bd298b4698c406c3445d88b21d47a0fbc56fae0dc6a5cc9c99c9a8ad4529349",
}
#: Row counts of the pinned runs, for a readable failure before the digest comparison.
PINNED_COUNTS = {
    "default_caps": {"counted": 262, "skipped": 95, "summary_rows": 3},
    "small_caps": {"counted": 262, "skipped": 95, "summary_rows": 3},
}

_WORD_TEXT = (
    "a red fox in the snow at dusk blue square circle under over café naïve 日本語 テキスト 🦊 🚀 "
    "make turn remove add the sky purple, tree; cat. dog! (left) [right] 12 345 6789 -- ... \n \t"
)
#: Words of the synthetic texts (non-ASCII, punctuation, bare whitespace tokens included).
WORDS = _WORD_TEXT.split(" ")


def _text(rng: random.Random, max_words: int = 40) -> str:
    roll = rng.random()
    if roll < 0.05:
        return ""
    if roll < 0.08:
        return " "
    if roll < 0.1:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(400, 900)))  # long: over small caps
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def _size(rng: random.Random) -> list[int]:
    roll = rng.random()
    if roll < 0.03:
        return [0, rng.randint(1, 500)]  # unusable size: rejected
    if roll < 0.1:
        return [rng.randint(16, 300), rng.randint(2000, 6000)]  # extreme aspect
    if roll < 0.2:
        return rng.choice([[1024, 1024], [512, 512], [640, 480]])  # common sizes repeat
    return [rng.randint(8, 3000), rng.randint(8, 3000)]


def _t2i_captions(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.03:
        return None
    if roll < 0.06:
        return "not json {"
    if roll < 0.08:
        return json.dumps([_text(rng)])
    if roll < 0.1:
        return json.dumps({"a": 3})
    if roll < 0.15:
        return "{}"
    values = [_text(rng) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.2:
        values.append(values[0])  # duplicate caption: variants with identical costs merge
    return json.dumps({f"k{i}": v for i, v in enumerate(values)}, ensure_ascii=rng.random() < 0.5)


def _edit_row(rng: random.Random) -> tuple[list[list[int]], list[list[str]] | None]:
    n = rng.choice([1, 2, 2, 3, 3, 4, 5, 6])
    base = _size(rng)
    sizes = [base if rng.random() < 0.7 else _size(rng) for _ in range(n)]
    roll = rng.random()
    if roll < 0.03:
        return sizes, None
    steps = max(n - 1, 0) + (1 if roll < 0.07 else 0)  # sometimes one entry too many
    instructions: list[list[str] | None] = []
    for _ in range(steps):
        r = rng.random()
        if r < 0.02:
            instructions.append(None)
        elif r < 0.04:
            instructions.append([])
        else:
            alternatives = [_text(rng, 15) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.15:
                alternatives.append(alternatives[0])
            instructions.append(alternatives)
    return sizes, instructions  # type: ignore[return-value]


def _vlm_line(rng: random.Random, index: int) -> tuple[str, list[list[int]]]:
    roll = rng.random()
    if roll < 0.02:
        return "{oops", []
    if roll < 0.04:
        return json.dumps([1, 2]), []
    if roll < 0.06:
        return json.dumps({"id": f"v{index}", "video": "clip.mp4", "conversations": []}), [[640, 480]]
    if roll < 0.08:
        return json.dumps({"id": f"v{index}", "conversations": "nope"}), []
    n = rng.choice([0, 0, 1, 1, 1, 2, 3, 4])
    names = [f"img_{index}_{k}.png" for k in range(n)]
    sizes = [_size(rng) for _ in range(n)]
    if rng.random() < 0.03:
        sizes = sizes[:-1] if sizes else [[100, 100]]  # names and sizes disagree
    conversations: list[dict[str, Any]] = []
    for turn in range(rng.randint(1, 4)):
        tags = rng.choice([0, 0, 1, 1, 2, 3]) if turn == 0 or rng.random() < 0.2 else 0
        pieces = [_text(rng, 20) for _ in range(tags + 1)]
        conversations.append({"from": "human", "value": "<image>".join(pieces)})
        if rng.random() < 0.1:
            conversations.append({"from": "system", "value": _text(rng)})
        if rng.random() < 0.03:
            conversations.append({"from": "gpt", "value": 7})
        elif rng.random() < 0.92:
            conversations.append({"from": "gpt", "value": _text(rng, 30)})
    record: dict[str, Any] = {"id": f"v{index}", "conversations": conversations}
    if n == 1 and rng.random() < 0.5:
        record["image"] = names[0]
    elif n:
        record["image"] = names
    return json.dumps(record, ensure_ascii=rng.random() < 0.5), sizes


def write_varied_fixture(root: Path, seed: int = 13) -> Any:
    """``stats_fixtures`` plus the synthetic rows described in the module docstring."""
    fx = write_fixture(root, t2i_files=2, edit_files=2, vlm_copies=2)
    rng = random.Random(seed)
    rows = pq.read_table(fx.index_dir / "index.parquet").to_pylist()

    for f in range(2):
        path = fx.t2i_files[0].parent / f"synthetic_{f}.parquet"
        captions = [_t2i_captions(rng) for _ in range(60)]
        sizes = [[_size(rng)] for _ in captions]
        table = pa.table({"image": pa.array([b""] * len(captions), pa.binary()), "captions": captions})
        pq.write_table(table, path, row_group_size=7)
        for i, s in enumerate(sizes):
            rows.append(_row("t2i", "t2i_pretrain", "t2i", path, i // 7, i % 7, i, s))

    path = fx.edit_files[0].parent / "synthetic.parquet"
    edits = [_edit_row(rng) for _ in range(90)]
    table = pa.table(
        {
            "image_list": pa.array([[b""] * len(s) for s, _ in edits], pa.list_(pa.binary())),
            "instruction_list": pa.array([ins for _, ins in edits], pa.list_(pa.list_(pa.string()))),
        }
    )
    pq.write_table(table, path, row_group_size=11)
    for i, (s, _) in enumerate(edits):
        rows.append(_row("seedx", "unified_edit", "edit", path, i // 11, i % 11, i, s))

    path = fx.jsonl.parent / "synthetic.jsonl"
    lines = [_vlm_line(rng, i) for i in range(120)]
    path.write_text("".join(line + "\n" for line, _ in lines))
    for i, (_, s) in enumerate(lines):
        rows.append(_row("llava", "vlm_sft", "vlm", path, -1, i, i, s))

    rows.append(_row("ghost", "t2i_pretrain", "t2i", fx.t2i_files[0], 0, 0, 0, [[64, 64]]))  # not configured
    write_index(rows, fx.index_dir / "index.parquet")
    return fx


def _canonical(value: Any, root: str) -> Any:
    """JSON-ready copy with the tmp root replaced (paths differ per run, values must not)."""
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, dict):
        return {k: _canonical(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, root) for v in value]
    return value


def _frame_payload(frame: pl.DataFrame, root: str, keys: list[str]) -> dict[str, Any]:
    frame = frame.with_columns(pl.col("source_file").str.replace_all(root, "<root>", literal=True))
    return {
        "schema": [[name, str(dtype)] for name, dtype in frame.schema.items()],
        "rows": _canonical(frame.sort(keys).rows(), root),
    }


def run_digest(fx: Any, out: Path, **kwargs: Any) -> tuple[str, dict[str, int], str]:
    """Run the statistics and reduce every output value to one digest (plus counts and the CLI table)."""
    registry, config = Registry.load(fx.registry), load_dataset_config(fx.groups)
    backend = load_tokenizer()[0].backend_tokenizer
    result = compute_token_stats(registry, config, fx.index_dir, out, backend, **kwargs)
    root = str(fx.root)
    keys = ["dataset", "source_file", "row_group", "row_index"]
    stats = pl.read_parquet(out / STATS_FILE)
    skipped = pl.read_parquet(out / SKIPPED_FILE)
    summary = pl.read_parquet(out / SUMMARY_FILE)
    payload = {
        "stats": _frame_payload(stats, root, keys),
        "skipped": _frame_payload(skipped, root, [*keys, "reason"]),
        "summary": {
            "schema": [[name, str(dtype)] for name, dtype in summary.schema.items()],
            "rows": summary.sort(["task", "dataset"]).rows(),
        },
        "summary_json": _canonical(json.loads((out / SUMMARY_JSON).read_text()), root),
        "result_summary_equals_file": result.summary.equals(summary),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True, allow_nan=True)
    counts = {"counted": stats.height, "skipped": skipped.height, "summary_rows": summary.height}
    return hashlib.sha256(text.encode()).hexdigest(), counts, format_summary_table(result.summary)


RUNS = {
    "default_caps": {},
    "small_caps": {"max_num_tokens_per_sample": 3000, "max_latent_size": 48},
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_varied_fixture(tmp_path_factory.mktemp("pin"))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_outputs_match_pinned_digest(fx, tmp_path, name):
    digest, counts, _ = run_digest(fx, tmp_path / name, **RUNS[name])
    assert counts == PINNED_COUNTS[name]
    assert digest == PINNED[name], f"token statistics values changed for run {name!r}"


def test_batch_size_does_not_change_outputs(fx, tmp_path):
    """Batches only group tokenizer calls: a batch of 7 (crossing files and tasks) gives the same values."""
    big = run_digest(fx, tmp_path / "big", **RUNS["small_caps"])
    small = run_digest(fx, tmp_path / "small", batch_size=7, **RUNS["small_caps"])
    assert small == big


def _reference_rows(fx: Any, cap: int, max_latent: int) -> tuple[dict[tuple, dict[str, Any]], dict[tuple, str]]:
    """Every configured ok sample counted the plain way: ``summarise_variants(sample_variants(...))`` over
    plans built with the tokenizer's real ids, one sample at a time (what the statistics did before the
    fast path), as token_stats.parquet rows and skip reasons keyed by (dataset, source_file, rg, row)."""
    config = load_dataset_config(fx.groups)
    groups = {(g.group, name): g for g in config.groups.values() for name in g.dataset_names}
    backend = load_tokenizer()[0].backend_tokenizer

    def ids_of(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    index = load_index(fx.index_dir)
    ok = index.filter(
        (pl.col("status") == "ok")
        & pl.Series([(g, d) in groups for g, d in zip(index["group"], index["dataset"])], dtype=pl.Boolean)
    )
    rows: dict[tuple, dict[str, Any]] = {}
    skipped: dict[tuple, str] = {}
    for s in iter_samples(ok):
        key = (s.dataset, s.source_file, s.row_group, s.row_index)
        try:
            cost = summarise_variants(sample_variants(s, groups[(s.group, s.dataset)], ids_of))
        except SampleRejected as exc:
            skipped[key] = exc.reason
            continue
        w = cost.worst
        rows[key] = {
            "text_tokens": w.text_tokens,
            "vit_tokens": w.vit_tokens,
            "vae_tokens": w.vae_tokens,
            "total_tokens": w.total,
            "est_tokens": w.estimate,
            "total_tokens_min": cost.total_min,
            "total_tokens_mean": cost.total_mean,
            "est_tokens_min": cost.estimate_min,
            "est_tokens_mean": cost.estimate_mean,
            "ce_tokens": w.ce_tokens,
            "mse_tokens": w.mse_tokens,
            "num_items": w.num_items,
            "num_variants": len(cost.counts),
            "max_vit_side": max(c.max_vit_side for c in cost.counts),
            "max_latent_side": max(c.max_latent_side for c in cost.counts),
            "over_cap": w.estimate > cap,
            "over_cap_always": cost.estimate_min > cap,
            "latent_overflow": max(c.max_latent_side for c in cost.counts) > max_latent,
            "vit_overflow": max(c.max_vit_side for c in cost.counts) > VIT_MAX_PATCHES_PER_SIDE,
            "variant_prob": list(cost.probs),
            "variant_est": [c.estimate for c in cost.counts],
            "variant_total": [c.total for c in cost.counts],
            "variant_cfg_text": [list(c.cfg_text) for c in cost.counts],
            "variant_cfg_vit": [list(c.cfg_vit) for c in cost.counts],
            "variant_cfg_vae": [list(c.cfg_vae) for c in cost.counts],
        }
    return rows, skipped


@pytest.mark.parametrize("seed", [13, 14])
def test_fast_path_equals_plan_builders(tmp_path, seed):
    """The batched fast path (texts counted by length, plan shapes memoised) gives exactly what building
    and counting every plan variant with real token ids gives, sample by sample, skips included."""
    fx = write_varied_fixture(tmp_path / "data", seed=seed)
    registry, config = Registry.load(fx.registry), load_dataset_config(fx.groups)
    caps = {"max_num_tokens_per_sample": 3000, "max_latent_size": 48}
    compute_token_stats(registry, config, fx.index_dir, tmp_path / "out", batch_size=64, **caps)
    expected_rows, expected_skips = _reference_rows(fx, caps["max_num_tokens_per_sample"], caps["max_latent_size"])
    stats = pl.read_parquet(tmp_path / "out" / STATS_FILE)
    got = {(r["dataset"], r["source_file"], r["row_group"], r["row_index"]): r for r in stats.to_dicts()}
    assert got.keys() == expected_rows.keys()
    for key, expected in expected_rows.items():
        assert {k: got[key][k] for k in expected} == expected, key
    skipped = pl.read_parquet(tmp_path / "out" / SKIPPED_FILE)
    reasons = {
        (r["dataset"], r["source_file"], r["row_group"], r["row_index"]): r["reason"] for r in skipped.to_dicts()
    }
    assert reasons == expected_skips
