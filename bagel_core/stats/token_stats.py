"""Exact token statistics per sample: ``token_stats.parquet`` + per-(dataset, task) summary.

Why: users must know what their data costs in tokens before launching (how full packs get, which
samples exceed ``max_num_tokens_per_sample``, which VAE images overflow ``max_latent_size``).
Every number comes from :func:`bagel_core.sequence.tokens.count_tokens` over plans built by the same
builders the packed dataset uses; the counting conventions (worst-case variant, min, expected
value; no CFG dropout) are documented in :mod:`bagel_core.data.tokens`.

Inputs: the index (one row per sample, ``status`` ok|quarantined, image sizes from the headers, no
texts), the registry, the dataset YAML (transform args per group). Texts are read from the source
files by the index keys, per file and per row group (pyarrow; JSONL read once per file). Texts of a
batch of samples are tokenised in one ``tokenizers`` ``encode_batch`` call (Rust, all cores).

Outputs in ``out_dir``:

* ``token_stats.parquet``: one row per counted sample: index keys (``dataset``, ``group``, ``task``,
  ``source_file``, ``row_group``, ``row_index``, ``file_row``); ``text_tokens``/``vit_tokens``/
  ``vae_tokens``/``total_tokens``/``est_tokens`` of the worst-case variant (wrapping tokens included);
  ``total_tokens_min``/``_mean``, ``est_tokens_min``/``_mean``; ``ce_tokens``, ``mse_tokens``,
  ``num_items``, ``num_variants``, ``max_vit_side``, ``max_latent_side``; flags ``over_cap``
  (worst estimate > cap), ``over_cap_always`` (every variant), ``latent_overflow``, ``vit_overflow``;
  and per variant ``variant_prob``/``variant_est``/``variant_total`` plus ``variant_cfg_text``/
  ``_vit``/``_vae`` (tokens of droppable items), which the packing simulation replays;
* ``token_stats_skipped.parquet``: every ok index row that could not be counted, with its reason;
* ``token_stats_summary.parquet`` / ``token_stats_summary.json``: per (dataset, task) count, sum,
  mean, p50/p90/p99/max of text/vit/vae/total tokens, plus cap and latent-size violations and the
  index's quarantined count.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bagel_core.config.dataset_config import DatasetConfig, GroupConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.index.schema import SAMPLE_LOCATION
from bagel_core.sequence.tokens import (
    DEFAULT_MAX_LATENT_SIZE,
    DEFAULT_MAX_TOKENS_PER_SAMPLE,
    VIT_MAX_PATCHES_PER_SIDE,
    SampleCost,
    SampleRejected,
    TextIds,
    build_vlm_plan,
    check_strides,
    edit_plan_variants,
    summarise_variants,
    t2i_plan_variants,
)

STATS_FILE = "token_stats.parquet"
SKIPPED_FILE = "token_stats_skipped.parquet"
SUMMARY_FILE = "token_stats_summary.parquet"
SUMMARY_JSON = "token_stats_summary.json"
KEY_COLUMNS = ("dataset", "source_file", "row_group", "row_index")
COUNT_COLUMNS = ("text_tokens", "vit_tokens", "vae_tokens", "total_tokens")


# ---- index ---------------------------------------------------------------------------------------
def index_files(index: str | Path) -> list[Path]:
    """The index parquet file(s): a file, ``DIR/index.parquet``, or the per-dataset
    ``DIR/datasets/*/*/index.parquet``."""
    path = Path(index)
    if path.is_file():
        return [path]
    if (path / "index.parquet").is_file():
        return [path / "index.parquet"]
    found = sorted(path.glob("datasets/*/*/index.parquet")) if path.is_dir() else []
    if not found:
        raise DataError(f"no index found at {path} (expected index.parquet); build it with `bagel data index`")
    return found


def load_index(index: str | Path) -> pl.DataFrame:
    """All index rows, in a stable order (dataset, file, row group, row)."""
    frames = [pl.read_parquet(p) for p in index_files(index)]
    frame = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    required = {"dataset", "group", "task", "source_file", "row_group", "row_index", "image_sizes", "status"}
    missing = sorted(required - set(frame.columns))
    if missing:
        raise DataError(f"index at {index} lacks column(s) {missing}; rebuild it with `bagel data index`")
    if "file_row" not in frame.columns:
        frame = frame.with_columns(pl.col("row_index").alias("file_row"))
    return frame.sort(["dataset", "source_file", "row_group", "row_index"])


# ---- batched tokenisation --------------------------------------------------------------------------
class BatchedTextIds:
    """Two-pass text lookup so plan builders stay the one implementation while tokenising in batches.

    Pass 1 (``record``) returns a placeholder id and remembers the text; ``flush`` encodes all new
    texts with one ``encode_batch`` call; pass 2 (``lookup``) returns the real ids.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.ids: dict[str, list[int]] = {}
        self.pending: dict[str, None] = {}
        self.texts_encoded = 0

    def record(self, text: str) -> Sequence[int]:
        if text not in self.ids:
            self.pending[text] = None
        return (0,)

    def flush(self) -> None:
        texts = list(self.pending)
        self.pending.clear()
        if texts:
            for text, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False)):
                self.ids[text] = enc.ids
            self.texts_encoded += len(texts)

    def lookup(self, text: str) -> Sequence[int]:
        return self.ids[text]

    def clear(self) -> None:
        self.ids.clear()


# ---- reading sample payloads -----------------------------------------------------------------------
@dataclass
class SampleRef:
    """An ok index row plus the payload read from its source file."""

    dataset: str
    group: str
    task: str
    source_file: str
    row_group: int
    row_index: int
    file_row: int
    image_sizes: list[tuple[int, int]]
    payload: Any = None


_PAYLOAD_COLUMN = {"t2i": "captions", "edit": "instruction_list"}


def _read_parquet_payloads(path: str, column: str, rows: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: column '{column}' is missing (columns: {pf.schema_arrow.names})")
    out: dict[tuple[int, int], Any] = {}
    by_rg: dict[int, list[int]] = defaultdict(list)
    for rg, row in rows:
        by_rg[rg].append(row)
    for rg, wanted in sorted(by_rg.items()):
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        for row in wanted:
            if row >= len(values):
                raise DataError(f"{path}: row group {rg} has {len(values)} rows, index names row {row}; re-index")
            out[(rg, row)] = values[row]
    return out


def _read_jsonl_payloads(path: str, rows: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    out: dict[tuple[int, int], Any] = {}
    for rg, line in rows:
        if line >= len(lines):
            raise DataError(f"{path}: has {len(lines)} lines, index names line {line}; re-index")
        try:
            out[(rg, line)] = json.loads(lines[line])
        except json.JSONDecodeError as exc:
            out[(rg, line)] = SampleRejected(f"line is not valid JSON ({exc.msg})")
    return out


def iter_samples(ok_rows: pl.DataFrame) -> Iterator[SampleRef]:
    """Yield ok index rows with their texts, reading each source file once."""
    for (source_file,), part in ok_rows.group_by(["source_file"], maintain_order=True):
        task = part["task"][0]
        keys = list(zip(part["row_group"].to_list(), part["row_index"].to_list()))
        if task == "vlm":
            payloads = _read_jsonl_payloads(source_file, keys)
        else:
            payloads = _read_parquet_payloads(source_file, _PAYLOAD_COLUMN[task], keys)
        for rec in part.iter_rows(named=True):
            key = (rec["row_group"], rec["row_index"])
            yield SampleRef(
                dataset=rec["dataset"],
                group=rec["group"],
                task=rec["task"],
                source_file=source_file,
                row_group=rec["row_group"],
                row_index=rec["row_index"],
                file_row=rec["file_row"],
                image_sizes=[(int(w), int(h)) for w, h in (rec["image_sizes"] or [])],
                payload=payloads[key],
            )


# ---- one sample -> variants --------------------------------------------------------------------------
def sample_variants(sample: SampleRef, group: GroupConfig, ids_of: TextIds):
    """Plan variants of one sample for its task, with the group's transforms."""
    if isinstance(sample.payload, SampleRejected):
        raise sample.payload
    if any(w <= 0 or h <= 0 for w, h in sample.image_sizes):
        raise SampleRejected(f"the index has no usable size for an image of this sample: {sample.image_sizes}")
    if sample.task == "t2i":
        if len(sample.image_sizes) != 1:
            raise SampleRejected(f"a T2I row needs exactly 1 image, the index lists {len(sample.image_sizes)}")
        return t2i_plan_variants(sample.payload, sample.image_sizes[0], group.image_transform_args, ids_of)
    if sample.task == "edit":
        if not isinstance(sample.payload, list):
            raise SampleRejected("instruction_list is not a list")
        return edit_plan_variants(
            sample.payload, sample.image_sizes, group.image_transform_args, group.vit_image_transform_args, ids_of
        )
    if sample.task == "vlm":
        if not isinstance(sample.payload, dict):
            raise SampleRejected("the JSONL line is not a JSON object")
        return [(1, build_vlm_plan(sample.payload, sample.image_sizes, group.image_transform_args, ids_of))]
    raise DataError(f"{sample.source_file}: unknown task {sample.task!r} in the index")


# ---- the run -------------------------------------------------------------------------------------
@dataclass
class TokenStatsResult:
    """What ``compute_token_stats`` wrote and found (paths, counts, the summary)."""

    out_dir: Path
    stats_path: Path
    skipped_path: Path
    summary_path: Path
    summary: pl.DataFrame
    num_counted: int
    num_skipped: int
    num_quarantined: int
    num_not_configured: int
    num_over_cap: int
    num_latent_overflow: int
    num_vit_overflow: int
    texts_encoded: int
    seconds: float
    max_num_tokens_per_sample: int
    max_latent_size: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)


class _Columns:
    """Column buffers of token_stats.parquet (appending to lists beats building per-row dicts)."""

    NAMES = (
        "dataset",
        "group",
        "task",
        "source_file",
        "row_group",
        "row_index",
        "file_row",
        "text_tokens",
        "vit_tokens",
        "vae_tokens",
        "total_tokens",
        "est_tokens",
        "total_tokens_min",
        "total_tokens_mean",
        "est_tokens_min",
        "est_tokens_mean",
        "ce_tokens",
        "mse_tokens",
        "num_items",
        "num_variants",
        "max_vit_side",
        "max_latent_side",
        "over_cap",
        "over_cap_always",
        "latent_overflow",
        "vit_overflow",
        "variant_prob",
        "variant_est",
        "variant_total",
        "variant_cfg_text",
        "variant_cfg_vit",
        "variant_cfg_vae",
    )

    def __init__(self) -> None:
        self.data: dict[str, list] = {name: [] for name in self.NAMES}

    def add(self, s: SampleRef, cost: SampleCost, cap: int, max_latent: int) -> None:
        w = cost.worst
        values = (
            s.dataset,
            s.group,
            s.task,
            s.source_file,
            s.row_group,
            s.row_index,
            s.file_row,
            w.text_tokens,
            w.vit_tokens,
            w.vae_tokens,
            w.total,
            w.estimate,
            cost.total_min,
            cost.total_mean,
            cost.estimate_min,
            cost.estimate_mean,
            w.ce_tokens,
            w.mse_tokens,
            w.num_items,
            len(cost.counts),
            max(c.max_vit_side for c in cost.counts),
            max(c.max_latent_side for c in cost.counts),
            w.estimate > cap,
            cost.estimate_min > cap,
            max(c.max_latent_side for c in cost.counts) > max_latent,
            max(c.max_vit_side for c in cost.counts) > VIT_MAX_PATCHES_PER_SIDE,
            list(cost.probs),
            [c.estimate for c in cost.counts],
            [c.total for c in cost.counts],
            [list(c.cfg_text) for c in cost.counts],
            [list(c.cfg_vit) for c in cost.counts],
            [list(c.cfg_vae) for c in cost.counts],
        )
        for name, value in zip(self.NAMES, values):
            self.data[name].append(value)

    SCHEMA = pa.schema(
        [
            *SAMPLE_LOCATION,
            *[
                (n, pa.int64())
                for n in ("text_tokens", "vit_tokens", "vae_tokens", "total_tokens", "est_tokens", "total_tokens_min")
            ],
            ("total_tokens_mean", pa.float64()),
            ("est_tokens_min", pa.int64()),
            ("est_tokens_mean", pa.float64()),
            *[(n, pa.int64()) for n in ("ce_tokens", "mse_tokens")],
            *[(n, pa.int32()) for n in ("num_items", "num_variants", "max_vit_side", "max_latent_side")],
            *[(n, pa.bool_()) for n in ("over_cap", "over_cap_always", "latent_overflow", "vit_overflow")],
            ("variant_prob", pa.list_(pa.float64())),
            ("variant_est", pa.list_(pa.int64())),
            ("variant_total", pa.list_(pa.int64())),
            *[(n, pa.list_(pa.list_(pa.int64()))) for n in ("variant_cfg_text", "variant_cfg_vit", "variant_cfg_vae")],
        ]
    )

    def write_to(self, writer: pq.ParquetWriter) -> None:
        """Append the buffered rows to the parquet file and start a new buffer (bounded memory)."""
        if self.data["dataset"]:
            writer.write_table(pa.table({name: self.data[name] for name in self.NAMES}, schema=self.SCHEMA))
        self.data = {name: [] for name in self.NAMES}


def _group_for(dataset_config: DatasetConfig) -> dict[tuple[str, str], GroupConfig]:
    out: dict[tuple[str, str], GroupConfig] = {}
    for group in dataset_config.groups.values():
        check_strides(
            group.image_transform_args if group.task in ("t2i", "edit") else None,
            group.vit_image_transform_args
            if group.task == "edit"
            else (group.image_transform_args if group.task == "vlm" else None),
            f"{dataset_config.source or '<dataset config>'}: {group.group}",
        )
        for name in group.dataset_names:
            out[(group.group, name)] = group
    return out


def compute_token_stats(
    registry: Registry,
    dataset_config: DatasetConfig,
    index: str | Path,
    out_dir: str | Path,
    tokenizer_backend: Any = None,
    max_num_tokens_per_sample: int = DEFAULT_MAX_TOKENS_PER_SAMPLE,
    max_latent_size: int = DEFAULT_MAX_LATENT_SIZE,
    batch_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> TokenStatsResult:
    """Count every ok sample of the configured datasets; write the stats, skips and summary files."""
    started = time.perf_counter()
    try:
        dataset_config.check_against(registry)
        groups = _group_for(dataset_config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if tokenizer_backend is None:
        tokenizer_backend = load_tokenizer()[0].backend_tokenizer
    frame = load_index(index)
    in_config = pl.Series([(g, d) in groups for g, d in zip(frame["group"], frame["dataset"])], dtype=pl.Boolean)
    not_configured = frame.filter(~in_config)
    frame = frame.filter(in_config)
    quarantined = frame.filter(pl.col("status") != "ok")
    ok_rows = frame.filter(pl.col("status") == "ok")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_stats = out / f".{STATS_FILE}.{os.getpid()}.tmp"
    writer = pq.ParquetWriter(tmp_stats, _Columns.SCHEMA)
    columns = _Columns()
    skipped: dict[str, list] = {
        k: [] for k in ("dataset", "group", "task", "source_file", "row_group", "row_index", "file_row", "reason")
    }
    texts = BatchedTextIds(tokenizer_backend)
    total = ok_rows.height
    done = 0

    def process(batch: list[SampleRef]) -> None:
        for s in batch:  # pass 1: record every text the plans need
            try:
                sample_variants(s, groups[(s.group, s.dataset)], texts.record)
            except SampleRejected:
                pass
        texts.flush()
        for s in batch:  # pass 2: real ids
            try:
                cost = summarise_variants(sample_variants(s, groups[(s.group, s.dataset)], texts.lookup))
            except SampleRejected as exc:
                for key, value in (
                    ("dataset", s.dataset),
                    ("group", s.group),
                    ("task", s.task),
                    ("source_file", s.source_file),
                    ("row_group", s.row_group),
                    ("row_index", s.row_index),
                    ("file_row", s.file_row),
                    ("reason", exc.reason),
                ):
                    skipped[key].append(value)
                continue
            columns.add(s, cost, max_num_tokens_per_sample, max_latent_size)
        texts.clear()
        columns.write_to(writer)

    batch: list[SampleRef] = []
    try:
        for sample in iter_samples(ok_rows):
            batch.append(sample)
            if len(batch) >= batch_size:
                process(batch)
                done += len(batch)
                batch = []
                if progress:
                    progress(done, total)
        if batch:
            process(batch)
            done += len(batch)
            if progress:
                progress(done, total)
    finally:
        writer.close()
    os.replace(tmp_stats, out / STATS_FILE)
    skipped_table = pa.table(
        skipped,
        schema=pa.schema(
            [
                *SAMPLE_LOCATION,
                ("reason", pa.string()),
            ]
        ),
    )
    pq.write_table(skipped_table, out / SKIPPED_FILE)
    stats = pl.read_parquet(out / STATS_FILE)
    summary = summarise(stats, quarantined, pl.from_arrow(skipped_table))
    summary.write_parquet(out / SUMMARY_FILE)
    reasons: dict[str, int] = defaultdict(int)
    for reason in skipped["reason"]:
        reasons[reason] += 1
    result = TokenStatsResult(
        out_dir=out,
        stats_path=out / STATS_FILE,
        skipped_path=out / SKIPPED_FILE,
        summary_path=out / SUMMARY_FILE,
        summary=summary,
        num_counted=stats.height,
        num_skipped=skipped_table.num_rows,
        num_quarantined=quarantined.height,
        num_not_configured=not_configured.height,
        num_over_cap=int(stats["over_cap"].sum()) if stats.height else 0,
        num_latent_overflow=int(stats["latent_overflow"].sum()) if stats.height else 0,
        num_vit_overflow=int(stats["vit_overflow"].sum()) if stats.height else 0,
        texts_encoded=texts.texts_encoded,
        seconds=time.perf_counter() - started,
        max_num_tokens_per_sample=max_num_tokens_per_sample,
        max_latent_size=max_latent_size,
        skipped_reasons=dict(reasons),
    )
    (out / SUMMARY_JSON).write_text(json.dumps(result_to_json(result, stats), indent=2))
    return result


# ---- summaries -------------------------------------------------------------------------------------
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def summarise(stats: pl.DataFrame, quarantined: pl.DataFrame, skipped: pl.DataFrame) -> pl.DataFrame:
    """Per (dataset, task): count, and sum/mean/p50/p90/p99/max of each count column (nearest rank)."""
    aggs: list[pl.Expr] = [pl.len().alias("count")]
    for col in COUNT_COLUMNS + ("est_tokens",):
        aggs += [pl.col(col).sum().alias(f"{col}_sum"), pl.col(col).mean().alias(f"{col}_mean")]
        aggs += [pl.col(col).quantile(q, "nearest").alias(f"{col}_{name}") for name, q in PERCENTILES]
        aggs.append(pl.col(col).max().alias(f"{col}_max"))
    aggs += [
        pl.col("total_tokens_mean").sum().alias("total_tokens_expected_sum"),
        pl.col("over_cap").sum().alias("over_cap"),
        pl.col("over_cap_always").sum().alias("over_cap_always"),
        pl.col("latent_overflow").sum().alias("latent_overflow"),
        pl.col("vit_overflow").sum().alias("vit_overflow"),
    ]
    if stats.height:
        summary = stats.group_by(["dataset", "task"], maintain_order=True).agg(aggs)
    else:
        summary = pl.DataFrame(schema={"dataset": pl.String, "task": pl.String, "count": pl.UInt32})
    extra = []
    for name, frame in (("quarantined", quarantined), ("skipped", skipped)):
        counts = (
            frame.group_by(["dataset", "task"]).agg(pl.len().alias(name))
            if frame.height
            else pl.DataFrame(schema={"dataset": pl.String, "task": pl.String, name: pl.UInt32})
        )
        extra.append(counts)
    for counts in extra:
        summary = summary.join(counts, on=["dataset", "task"], how="full", coalesce=True)
    fill = [c for c in summary.columns if c in ("count", "quarantined", "skipped")]
    return summary.with_columns([pl.col(c).fill_null(0) for c in fill]).sort(["task", "dataset"])


def over_cap_rows(stats: pl.DataFrame, limit: int | None = None) -> pl.DataFrame:
    """Samples whose worst-case estimate exceeds the per-sample cap (largest first)."""
    rows = (
        stats.filter(pl.col("over_cap") | pl.col("latent_overflow") | pl.col("vit_overflow"))
        .select(
            [
                "dataset",
                "task",
                "source_file",
                "row_group",
                "row_index",
                "est_tokens",
                "est_tokens_min",
                "total_tokens",
                "max_latent_side",
                "max_vit_side",
                "over_cap",
                "over_cap_always",
                "latent_overflow",
                "vit_overflow",
            ]
        )
        .sort("est_tokens", descending=True)
    )
    return rows.head(limit) if limit is not None else rows


def result_to_json(result: TokenStatsResult, stats: pl.DataFrame) -> dict[str, Any]:
    """The summary JSON: totals, conventions, per-(dataset, task) rows, the first 100 violations."""
    return {
        "counted": result.num_counted,
        "skipped": result.num_skipped,
        "skipped_reasons": result.skipped_reasons,
        "quarantined_in_index": result.num_quarantined,
        "index_rows_not_in_dataset_config": result.num_not_configured,
        "max_num_tokens_per_sample": result.max_num_tokens_per_sample,
        "max_latent_size": result.max_latent_size,
        "over_cap": result.num_over_cap,
        "latent_overflow": result.num_latent_overflow,
        "vit_overflow": result.num_vit_overflow,
        "convention": "worst-case variant (largest packer estimate) per sample; min and expected also "
        "reported; no CFG dropout; see bagel_core.data.tokens",
        "per_dataset": result.summary.to_dicts(),
        "violations_first_100": over_cap_rows(stats, 100).to_dicts() if stats.height else [],
    }


def format_summary_table(summary: pl.DataFrame) -> str:
    """Plain-text table for the CLI: one line per (dataset, task, column)."""
    head = (
        f"{'dataset':<20} {'task':<5} {'column':<13} {'count':>7} {'sum':>12} {'mean':>9} "
        f"{'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in summary.to_dicts():
        for col in COUNT_COLUMNS:
            if row.get(f"{col}_sum") is None:
                continue
            lines.append(
                f"{row['dataset']:<20} {row['task']:<5} {col:<13} {row['count']:>7} {row[f'{col}_sum']:>12} "
                f"{row[f'{col}_mean']:>9.1f} {row[f'{col}_p50']:>7} {row[f'{col}_p90']:>7} "
                f"{row[f'{col}_p99']:>7} {row[f'{col}_max']:>7}"
            )
        lines.append(
            f"{'':<20} {'':<5} over cap: {row.get('over_cap', 0)}  latent overflow: {row.get('latent_overflow', 0)}"
            f"  quarantined: {row.get('quarantined', 0)}  skipped: {row.get('skipped', 0)}"
        )
    return "\n".join(lines)
