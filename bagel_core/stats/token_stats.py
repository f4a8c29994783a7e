"""Exact token statistics per sample: ``token_stats.parquet`` + per-(dataset, task) summary.

Why: users must know what their data costs in tokens before launching (how full packs get, which
samples exceed ``max_num_tokens_per_sample``, which VAE images overflow ``max_latent_size``).
Every number comes from :func:`bagel_core.sequence.tokens.count_tokens` over plans built by the same
builders the packed dataset uses; the counting conventions (worst-case variant, min, expected
value; no CFG dropout) are documented in :mod:`bagel_core.sequence.tokens`.

Inputs: the index (one row per sample, ``status`` ok|quarantined, image sizes from the headers, no
texts), the registry, the dataset YAML (transform args per group). Texts are read from the source
files by the index keys, per file and per row group (pyarrow; JSONL read once per file).

Speed (it should run near the tokenizer's own rate): the distinct texts of a batch of samples are
tokenised in one ``tokenizers`` call (Rust, all cores, on a worker thread while Python prepares the
next batch), keeping only their lengths, since every count depends on the number of ids only. Plans
are not rebuilt per variant: each plan *shape* (task, resized image sizes, span) is built once with
the real builder and counted with ``count_tokens``, then evaluated per tuple of text lengths
(:class:`_Shape`, :class:`_Counter`); columns are assembled with numpy/arrow per batch. The result is
value-identical to counting every variant's plan one by one (:func:`sample_variants` +
``summarise_variants``), which tests/test_stats_output_pin.py checks sample by sample.

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

import gc
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, islice, pairwise, product
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bagel_core.config.dataset_config import DatasetConfig, GroupConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.image_args import ImageTransformArgs
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.index.schema import SAMPLE_LOCATION
from bagel_core.sequence.tokens import (
    DEFAULT_MAX_LATENT_SIZE,
    DEFAULT_MAX_TOKENS_PER_SAMPLE,
    TEXT,
    VIT_MAX_PATCHES_PER_SIDE,
    EditSpan,
    PlanItem,
    SamplePlan,
    SampleRejected,
    TextIds,
    TokenCount,
    _instruction_alternatives,
    build_edit_plan,
    build_t2i_plan,
    build_vlm_plan,
    check_strides,
    concatenated_instruction,
    count_tokens,
    edit_plan_variants,
    edit_span_distribution,
    resized,
    t2i_caption_texts,
    t2i_plan_variants,
    vlm_elements,
    vlm_image_names,
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


# ---- reading sample payloads -----------------------------------------------------------------------
@dataclass
class SampleRef:
    """An ok index row plus the payload read from its source file (the reference path's sample)."""

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

#: One sample as the fast path carries it: (dataset, group, task, source_file, row_group, row_index,
#: file_row, image_sizes, payload). A plain tuple: 20k+ samples/s leave no room for per-row objects.
_Row = tuple[str, str, str, str, int, int, int, list[tuple[int, int]], Any]


def _read_parquet_payloads(path: str, column: str, rows: Sequence[tuple[int, int]]) -> list[Any]:
    """Payload cells of ``rows`` ((row group, row) pairs), in order; each row group is read once."""
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: column '{column}' is missing (columns: {pf.schema_arrow.names})")
    by_rg: dict[int, list[int]] = defaultdict(list)
    for rg, row in rows:
        by_rg[rg].append(row)
    cells: dict[int, list[Any]] = {}
    for rg, wanted in sorted(by_rg.items()):
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        for row in wanted:
            if row >= len(values):
                raise DataError(f"{path}: row group {rg} has {len(values)} rows, index names row {row}; re-index")
        cells[rg] = values
    return [cells[rg][row] for rg, row in rows]


def _read_jsonl_payloads(path: str, rows: Sequence[tuple[int, int]]) -> list[Any]:
    """Parsed JSONL records of ``rows`` ((-1, line) pairs), in order; a bad line becomes a rejection."""
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    out: list[Any] = []
    loads = json.loads
    for _, line in rows:
        if line >= len(lines):
            raise DataError(f"{path}: has {len(lines)} lines, index names line {line}; re-index")
        try:
            out.append(loads(lines[line]))
        except json.JSONDecodeError as exc:
            out.append(SampleRejected(f"line is not valid JSON ({exc.msg})"))
    return out


def _image_sizes(column: pl.Series) -> list[list[tuple[int, int]]]:
    """``[(w, h), ...]`` per index row, from the flat arrow buffers (a null list reads as no image).

    Converting the nested list column through Python lists cost more than counting a T2I sample;
    here the pairs are made once from two flat integer lists and each row takes a slice. Anything
    but clean pairs goes through the plain per-row conversion, which fails (or not) as it always did.
    """
    arr = column.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if not (
        (pa.types.is_list(t) or pa.types.is_large_list(t))
        and (pa.types.is_list(t.value_type) or pa.types.is_large_list(t.value_type))
        and pa.types.is_integer(t.value_type.value_type)
    ):
        return [[(int(w), int(h)) for w, h in (s or [])] for s in column.to_list()]
    pairs_arr = arr.flatten()
    values = pairs_arr.flatten()
    if pairs_arr.null_count or values.null_count or len(values) != 2 * len(pairs_arr):
        return [[(int(w), int(h)) for w, h in (s or [])] for s in column.to_list()]
    if len(pairs_arr) and not np.all(pairs_arr.value_lengths().to_numpy() == 2):
        return [[(int(w), int(h)) for w, h in (s or [])] for s in column.to_list()]
    flat = values.to_numpy(zero_copy_only=False)
    pairs = list(zip(flat[0::2].tolist(), flat[1::2].tolist()))
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), out=offsets[1:])
    bounds = offsets.tolist()
    return [pairs[a:b] for a, b in pairwise(bounds)]


def _iter_rows(ok_rows: pl.DataFrame) -> Iterator[_Row]:
    """Ok index rows with their payloads, file by file (each source file read once), column-wise."""
    for (source_file,), part in ok_rows.group_by(["source_file"], maintain_order=True):
        task = part["task"][0]
        keys = list(zip(part["row_group"].to_list(), part["row_index"].to_list()))
        if task == "vlm":
            payloads = _read_jsonl_payloads(source_file, keys)
        else:
            payloads = _read_parquet_payloads(source_file, _PAYLOAD_COLUMN[task], keys)
        sizes = _image_sizes(part["image_sizes"])
        yield from zip(
            part["dataset"].to_list(),
            part["group"].to_list(),
            part["task"].to_list(),
            [source_file] * part.height,
            part["row_group"].to_list(),
            part["row_index"].to_list(),
            part["file_row"].to_list(),
            sizes,
            payloads,
        )


def iter_samples(ok_rows: pl.DataFrame) -> Iterator[SampleRef]:
    """Yield ok index rows with their texts as :class:`SampleRef` (reference path, tests)."""
    for row in _iter_rows(ok_rows):
        yield SampleRef(*row)


# ---- one sample -> variants --------------------------------------------------------------------------
def _check_sample(task: str, payload: Any, image_sizes: Sequence[tuple[int, int]], source_file: str) -> None:
    """Rejections both paths share, in the order upstream meets them (the first failing one is reported)."""
    if isinstance(payload, SampleRejected):
        raise SampleRejected(payload.reason)  # a fresh one: raising the stored one would tie it to these frames
    if any(w <= 0 or h <= 0 for w, h in image_sizes):
        raise SampleRejected(f"the index has no usable size for an image of this sample: {image_sizes}")
    if task == "t2i":
        if len(image_sizes) != 1:
            raise SampleRejected(f"a T2I row needs exactly 1 image, the index lists {len(image_sizes)}")
    elif task == "edit":
        if not isinstance(payload, list):
            raise SampleRejected("instruction_list is not a list")
    elif task == "vlm":
        if not isinstance(payload, dict):
            raise SampleRejected("the JSONL line is not a JSON object")
    else:
        raise DataError(f"{source_file}: unknown task {task!r} in the index")


def sample_variants(sample: SampleRef, group: GroupConfig, ids_of: TextIds) -> list[tuple[float, SamplePlan]]:
    """Plan variants of one sample for its task, with the group's transforms.

    The reference the fast path of :func:`compute_token_stats` must equal (``summarise_variants``
    over these plans); the packed dataset builds its plans with the same builders.
    """
    _check_sample(sample.task, sample.payload, sample.image_sizes, sample.source_file)
    if sample.task == "t2i":
        return t2i_plan_variants(sample.payload, sample.image_sizes[0], group.image_transform_args, ids_of)
    if sample.task == "edit":
        return edit_plan_variants(
            sample.payload, sample.image_sizes, group.image_transform_args, group.vit_image_transform_args, ids_of
        )
    return [(1, build_vlm_plan(sample.payload, sample.image_sizes, group.image_transform_args, ids_of))]


# ---- fast counting: plan shapes counted once, texts only by length ---------------------------------
def _zeros(n: int) -> tuple[int, ...]:
    """Stand-in ids of a text of ``n`` tokens: every count depends on the length of the ids only."""
    return (0,) * n


@lru_cache(maxsize=1 << 14)
def _text_cost(n: int, loss: bool, enable_cfg: bool) -> tuple[int, int, int, tuple[int, ...]]:
    """(text, estimate, ce, cfg_text) that one text item of ``n`` ids adds, as ``count_tokens`` says."""
    c = count_tokens(SamplePlan((PlanItem.text(_zeros(n), loss=loss, enable_cfg=enable_cfg),)))
    return c.text_tokens, c.estimate, c.ce_tokens, c.cfg_text


@lru_cache(maxsize=1 << 14)
def _vit_cost(size: tuple[int, int], stride: int) -> tuple[int, int, int]:
    """(vit, estimate, max_vit_side) that one placed VLM ViT image (no cfg) adds, as ``count_tokens`` says."""
    c = count_tokens(SamplePlan((PlanItem.vit(size, stride, 0),)))
    return c.vit_tokens, c.estimate, c.max_vit_side


@lru_cache(maxsize=1 << 14)
def _unplaced_cost(width: int, height: int, stride: int) -> int:
    """Estimate that one resized-but-unplaced VLM image adds, as ``count_tokens`` says."""
    return count_tokens(SamplePlan((), ((width, height, stride),))).estimate


class _Shape:
    """``count_tokens`` of one plan shape (items fixed, text lengths free), evaluated per length tuple.

    ``count_tokens`` is a fold over items in which a text item's share depends only on its length and
    flags, so the count of a plan = the count of the same plan with every text empty, minus those empty
    texts' shares, plus the real texts' shares (:func:`_text_cost`). The shape is built once with the
    real builder and checked against ``count_tokens`` on the real plan with other lengths when made, so
    a change of the accounting rules fails loudly instead of drifting.
    """

    __slots__ = ("base", "ce", "estimate", "slots", "text")

    def __init__(self, build: Callable[[list[tuple[int, ...]]], SamplePlan], num_texts: int) -> None:
        plan = build([_zeros(0)] * num_texts)
        base = count_tokens(plan)
        self.base = base
        self.slots = tuple((item.loss, item.enable_cfg) for item in plan.items if item.kind == TEXT)
        if len(self.slots) != num_texts:
            raise RuntimeError(f"plan shape has {len(self.slots)} text items, expected {num_texts}")
        self.text, self.estimate, self.ce = base.text_tokens, base.estimate, base.ce_tokens
        for loss, cfg in self.slots:
            t, e, c, _ = _text_cost(0, loss, cfg)
            self.text, self.estimate, self.ce = self.text - t, self.estimate - e, self.ce - c
        if base.cfg_text != sum((_text_cost(0, loss, cfg)[3] for loss, cfg in self.slots), ()):
            raise RuntimeError("cfg_text of a plan shape does not come from its text items only")
        probe = tuple(3 + 2 * k for k in range(num_texts))
        if self.count(probe) != count_tokens(build([_zeros(n) for n in probe])):
            raise RuntimeError(
                "count_tokens is no longer a fold in which a text item's share depends on its length and "
                "flags only; the statistics' plan shapes (_Shape) must follow the new rule"
            )

    def count(self, lengths: tuple[int, ...]) -> TokenCount:
        """``count_tokens`` of this shape's plan whose text items have ``lengths`` ids."""
        text, estimate, ce, cfg_text = self.text, self.estimate, self.ce, ()
        for (loss, cfg), n in zip(self.slots, lengths):
            t, e, c, g = _text_cost(n, loss, cfg)
            text, estimate, ce, cfg_text = text + t, estimate + e, ce + c, cfg_text + g
        b = self.base
        return TokenCount(
            text,
            b.vit_tokens,
            b.vae_tokens,
            estimate,
            b.num_items,
            ce,
            b.mse_tokens,
            b.max_vit_side,
            b.max_latent_side,
            cfg_text,
            b.cfg_vit,
            b.cfg_vae,
        )


#: Bound on memoised plan shapes per run (keys are resized sizes, so real data stays far below it).
_MAX_SHAPES = 1 << 16


class _Counter:
    """Per-run fast path: pass 1 (``prepare``) lists a sample's texts, pass 2 (``variants``) counts.

    Replaces "build every plan twice" (once to collect texts, once with ids) by: collect texts with
    the same parsing helpers the builders use, tokenise them once per batch for their *lengths*, and
    evaluate memoised plan shapes (:class:`_Shape`, keyed on resized image sizes) per length tuple.
    T2I and edit variants are enumerated exactly as ``t2i_plan_variants`` / ``edit_plan_variants`` do
    (same order, same float probabilities), VLM plans are folded item by item like ``build_vlm_plan``;
    where that builder would reject a record the builder itself is called for the reason. Every value
    equals ``summarise_variants(sample_variants(...))`` (tests/test_stats_output_pin.py checks both).
    """

    def __init__(self, groups: dict[tuple[str, str], GroupConfig]) -> None:
        self.groups = groups
        self.t2i_shapes: dict[tuple[int, tuple[int, int]], _Shape] = {}
        self.edit_shapes: dict[tuple[Any, ...], list[tuple[float, EditSpan, _Shape]]] = {}
        self.sizes: dict[tuple[int, int, int, int], tuple[int, int]] = {}
        self.counts: dict[tuple[_Shape, tuple[int, ...]], TokenCount] = {}

    def _count(self, shape: _Shape, lengths: tuple[int, ...]) -> TokenCount:
        """``shape.count(lengths)`` memoised (bounded): one image size and a few text lengths recur a lot,
        and a lookup is several times cheaper than making the count. Keyed on the shape object itself,
        so an entry can never be read for another shape."""
        key = (shape, lengths)
        hit = self.counts.get(key)
        if hit is None:
            if len(self.counts) >= _MAX_SHAPES:
                self.counts.clear()
            hit = self.counts[key] = shape.count(lengths)
        return hit

    def _resized(self, args: ImageTransformArgs, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """:func:`resized` memoised per run by the args' identity (hashing the frozen dataclass on every
        lookup cost more than the rest of a T2I sample); ``self.groups`` keeps every args object alive."""
        key = (id(args), width, height, img_num)
        size = self.sizes.get(key)
        if size is None:
            if len(self.sizes) >= _MAX_SHAPES:
                self.sizes.clear()
            size = self.sizes[key] = resized(args, width, height, img_num)
        return size

    # -- pass 1 -----------------------------------------------------------------------------------------
    def prepare(self, row: _Row, want: Callable[[str], None]) -> tuple[Any, ...]:
        """Check the sample, hand every text its plans need to ``want``, return what pass 2 needs."""
        dataset, group_name, task, source_file, _, _, _, sizes, payload = row
        _check_sample(task, payload, sizes, source_file)
        group = self.groups[(group_name, dataset)]
        if task == "t2i":
            texts = t2i_caption_texts(payload)
            for text in texts:
                want(text)
            args = group.image_transform_args
            key = (id(args), self._resized(args, sizes[0][0], sizes[0][1]))
            shape = self.t2i_shapes.get(key)
            if shape is None:
                size = sizes[0]
                shape = _Shape(lambda ids: build_t2i_plan(ids[0], size, args), 1)
                if len(self.t2i_shapes) >= _MAX_SHAPES:
                    self.t2i_shapes.clear()
                self.t2i_shapes[key] = shape
            return ("t2i", shape, texts)
        if task == "edit":
            alternatives = _instruction_alternatives(payload, len(sizes))
            for options in alternatives:
                for text in options:
                    want(text)
            spans = self._edit_spans(group, sizes)
            concatenated: list[list[str] | None] = []
            for _, span, _ in spans:
                if not span.concatenated:
                    concatenated.append(None)
                    continue
                steps = [alternatives[idx - 1] for idx in range(span.start + 1, span.end + 1)]
                texts = [concatenated_instruction(combo) for combo in product(*steps)]
                for text in texts:
                    want(text)
                concatenated.append(texts)
            return ("edit", spans, alternatives, concatenated)
        # vlm: record texts in the order build_vlm_plan asks for them, up to where it would stop
        if len(vlm_image_names(payload)) != len(sizes):
            return ("vlm-reject", group)
        img_num = len(sizes)
        elements = vlm_elements(payload.get("conversations"), img_num)
        placed = 0
        for element in elements:
            if element.kind == TEXT:
                want(element.text)
            elif placed >= img_num:
                break
            else:
                placed += 1
        return ("vlm", group, elements)

    def _edit_spans(self, group: GroupConfig, sizes: list[tuple[int, int]]) -> list[tuple[float, EditSpan, _Shape]]:
        """Spans of an edit row with their probability and plan shape, memoised on the resized sizes."""
        vae_args, vit_args = group.image_transform_args, group.vit_image_transform_args
        vae_sizes = [self._resized(vae_args, w, h) for w, h in sizes]  # = edit_image_sizes(sizes, vae, vit)
        vit_sizes = [self._resized(vit_args, w, h) for w, h in sizes]
        resized_sizes = (vae_sizes, vit_sizes)
        key = (id(vae_args), id(vit_args), *vae_sizes, None, *vit_sizes)
        spans = self.edit_shapes.get(key)
        if spans is None:
            spans = []
            for p_span, span in edit_span_distribution(len(sizes)):

                def build(ids: list[tuple[int, ...]], span: EditSpan = span) -> SamplePlan:
                    return build_edit_plan(sizes, span, ids, vae_args, vit_args, resized_sizes)

                num_texts = 1 if span.concatenated else span.end - span.start
                spans.append((float(p_span), span, _Shape(build, num_texts)))
            if len(self.edit_shapes) >= _MAX_SHAPES:
                self.edit_shapes.clear()
            self.edit_shapes[key] = spans
        return spans

    # -- pass 2 -----------------------------------------------------------------------------------------
    def variants(self, row: _Row, job: tuple[Any, ...], lengths: dict[str, int]) -> list[tuple[float, TokenCount]]:
        """(probability, count) of every plan variant, in the reference builders' order."""
        kind = job[0]
        count = self._count
        if kind == "t2i":
            _, shape, texts = job
            p = 1.0 / len(texts)
            return [(p, count(shape, (lengths[text],))) for text in texts]
        if kind == "edit":
            _, spans, alternatives, concatenated = job
            out: list[tuple[float, TokenCount]] = []
            for (p_span, span, shape), concat_texts in zip(spans, concatenated):
                if concat_texts is not None:
                    p = p_span / len(concat_texts)
                    out += [(p, count(shape, (lengths[text],))) for text in concat_texts]
                    continue
                steps = [[lengths[t] for t in alternatives[idx - 1]] for idx in range(span.start + 1, span.end + 1)]
                combos = list(product(*steps))
                p = p_span / len(combos)
                out += [(p, count(shape, combo)) for combo in combos]
            return out
        return [(1, self._vlm_count(row, job, lengths))]

    def _vlm_count(self, row: _Row, job: tuple[Any, ...], lengths: dict[str, int]) -> TokenCount:
        """``count_tokens(build_vlm_plan(...))`` folded item by item without building the plan."""
        sizes, record, group = row[7], row[8], job[1]
        if job[0] == "vlm-reject":
            return self._vlm_reference(record, sizes, group, lengths)
        args = group.image_transform_args
        stride, img_num = args.image_stride, len(sizes)
        resized_sizes = [self._resized(args, w, h, img_num) for w, h in sizes]
        text = estimate = ce = vit = items = max_vit_side = placed = 0
        has_loss = False
        for element in job[2]:
            if element.kind == TEXT:
                n = lengths[element.text]
                if n > 0:
                    t, e, c, _ = _text_cost(n, element.loss, False)
                    text, estimate, ce, items = text + t, estimate + e, ce + c, items + 1
                    has_loss = has_loss or element.loss
                continue
            if placed >= img_num:
                return self._vlm_reference(record, sizes, group, lengths)
            v, e, side = _vit_cost(resized_sizes[placed], stride)
            vit, estimate, items, placed = vit + v, estimate + e, items + 1, placed + 1
            max_vit_side = max(max_vit_side, side)
        if not has_loss:
            return self._vlm_reference(record, sizes, group, lengths)
        for width, height in resized_sizes[placed:]:
            estimate += _unplaced_cost(width, height, stride)
        return TokenCount(text, vit, 0, estimate, items, ce, 0, max_vit_side, 0)

    @staticmethod
    def _vlm_reference(
        record: dict[str, Any], sizes: list[tuple[int, int]], group: GroupConfig, lengths: dict[str, int]
    ) -> TokenCount:
        """The builder itself, for records it rejects (its reason is the one reported)."""
        plan = build_vlm_plan(record, sizes, group.image_transform_args, lambda text: _zeros(lengths[text]))
        raise RuntimeError(f"fast VLM count rejected a record build_vlm_plan accepts ({len(plan.items)} items)")


# ---- output rows ---------------------------------------------------------------------------------
STATS_SCHEMA = pa.schema(
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
SKIPPED_SCHEMA = pa.schema([*SAMPLE_LOCATION, ("reason", pa.string())])
SAMPLE_LOCATION_SCHEMA = pa.schema(SAMPLE_LOCATION)


#: One counted sample, summarised: (probabilities, distinct counts sorted by (estimate, total), index of the
#: worst-case count, probability-weighted total, probability-weighted estimate).
_Summary = tuple[tuple[float, ...], tuple[TokenCount, ...], int, float, float]


def _summarise(variants: list[tuple[float, TokenCount]]) -> _Summary:
    """What ``summarise_variants`` + :class:`SampleCost` derive from a sample's variants, bit for bit.

    Identical counts merge with their probabilities summed in variant order; counts are ordered by
    (estimate, total) with ties in first-seen order; the worst case is the first of the largest key
    (what ``max`` returns); the means are the same ``sum`` over the same products in the same order.
    """
    if len(variants) == 1:
        p, only = variants[0]
        prob = 0.0 + float(p)
        return (prob,), (only,), 0, prob * (only[0] + only[1] + only[2]), prob * only[3]
    merged: dict[TokenCount, float] = {}
    for p, count in variants:
        merged[count] = merged.get(count, 0.0) + float(p)
    if len(merged) == 1:
        ((only, prob),) = merged.items()
        return (prob,), (only,), 0, prob * (only[0] + only[1] + only[2]), prob * only[3]
    # TokenCount fields by position (cheaper than its ``total`` property): 0-2 text/vit/vae, 3 estimate
    ordered = sorted(merged.items(), key=lambda kv: (kv[0][3], kv[0][0] + kv[0][1] + kv[0][2]))
    probs = tuple(p for _, p in ordered)
    counts = tuple(c for c, _ in ordered)
    totals = [c[0] + c[1] + c[2] for c in counts]
    worst = len(counts) - 1
    while worst and counts[worst - 1][3] == counts[worst][3] and totals[worst - 1] == totals[worst]:
        worst -= 1
    total_mean = sum([p * t for p, t in zip(probs, totals)])
    estimate_mean = sum([p * c[3] for p, c in zip(probs, counts)])
    return probs, counts, worst, total_mean, estimate_mean


def _nested_int_lists(outer_offsets: pa.Array, inner: Sequence[tuple[int, ...]]) -> pa.Array:
    """list<list<int64>> from per-variant tuples and the per-sample variant offsets."""
    inner_offsets = np.zeros(len(inner) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, inner), dtype=np.int32, count=len(inner)), out=inner_offsets[1:])
    values = np.fromiter(chain.from_iterable(inner), dtype=np.int64, count=int(inner_offsets[-1]))
    return pa.ListArray.from_arrays(outer_offsets, pa.ListArray.from_arrays(pa.array(inner_offsets), values))


def _stats_table(keys: list[tuple[Any, ...]], summaries: list[_Summary], cap: int, max_latent: int) -> pa.Table:
    """token_stats.parquet rows of a batch, built column-wise from the flat list of all variants' counts.

    Integer columns (worst case, minima, maxima, flags) are numpy gathers and segment reductions over
    the flat variants, which are exact; the float means come from :func:`_summarise`.
    """
    probs, counts, worst, total_mean, estimate_mean = zip(*summaries)
    num_variants = np.fromiter(map(len, counts), dtype=np.int32, count=len(counts))
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(num_variants, out=offsets[1:])
    starts = offsets[:-1]
    fields = list(zip(*chain.from_iterable(counts)))  # TokenCount fields over every variant of the batch
    text, vit, vae, estimate, num_items, ce, mse, vit_side, latent_side = (
        np.array(fields[i], dtype=np.int64) for i in range(9)
    )
    total = text + vit + vae
    w = starts + np.array(worst, dtype=np.int32)
    estimate_min = np.minimum.reduceat(estimate, starts)
    max_vit_side = np.maximum.reduceat(vit_side, starts)
    max_latent_side = np.maximum.reduceat(latent_side, starts)
    outer = pa.array(offsets)
    columns = [pa.array(column, type=f.type) for column, f in zip(zip(*keys), SAMPLE_LOCATION_SCHEMA)]
    columns += [
        text[w],
        vit[w],
        vae[w],
        total[w],
        estimate[w],
        np.minimum.reduceat(total, starts),
        pa.array(total_mean, type=pa.float64()),
        estimate_min,
        pa.array(estimate_mean, type=pa.float64()),
        ce[w],
        mse[w],
        num_items[w].astype(np.int32),
        num_variants,
        max_vit_side.astype(np.int32),
        max_latent_side.astype(np.int32),
        estimate[w] > cap,
        estimate_min > cap,
        max_latent_side > max_latent,
        max_vit_side > VIT_MAX_PATCHES_PER_SIDE,
        pa.ListArray.from_arrays(outer, pa.array(list(chain.from_iterable(probs)), type=pa.float64())),
        pa.ListArray.from_arrays(outer, estimate),
        pa.ListArray.from_arrays(outer, total),
        _nested_int_lists(outer, fields[9]),
        _nested_int_lists(outer, fields[10]),
        _nested_int_lists(outer, fields[11]),
    ]
    return pa.Table.from_arrays([pa.array(c) if isinstance(c, np.ndarray) else c for c in columns], schema=STATS_SCHEMA)


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


class _Encoder:
    """One tokenizer call per batch over its distinct texts, keeping only each text's token count.

    ``encode_batch_fast`` (tokenizers >= 0.21) skips the character offsets nobody here reads; any
    other backend falls back to ``encode_batch``. ``len(encoding)`` is its number of ids.
    """

    def __init__(self, backend: Any) -> None:
        fast = getattr(backend, "encode_batch_fast", None)
        self.encode = fast if callable(fast) else backend.encode_batch
        self.texts_encoded = 0

    def lengths(self, texts: list[str]) -> dict[str, int]:
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return {}
        self.texts_encoded += len(distinct)
        return dict(zip(distinct, map(len, self.encode(distinct, add_special_tokens=False))))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector for the run, restoring its state afterwards.

    A run allocates millions of small tuples; the collector, triggered by allocation counts, kept
    re-walking every live payload and batch object (about 0.3 of 1.6 CPU-seconds on the 20k-sample
    bench). Nothing here forms reference cycles (rejections are kept as reason strings, never as
    exceptions holding frames), so reference counting alone frees everything; the collector's
    previous state is restored when the run ends, however it ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    """Count every ok sample of the configured datasets; write the stats, skips and summary files.

    Per batch of ``batch_size`` samples: pass 1 checks each sample and lists its texts, one tokenizer
    call counts the distinct texts, pass 2 evaluates the plan variants by text length (see
    :class:`_Counter`) and the batch is appended to the parquet file (bounded memory).
    """
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
    writer = pq.ParquetWriter(tmp_stats, STATS_SCHEMA)
    skipped: list[tuple[Any, ...]] = []
    encoder = _Encoder(tokenizer_backend)
    counter = _Counter(groups)
    total = ok_rows.height
    done = 0

    def prepare(batch: list[_Row]) -> tuple[list[tuple[Any, ...] | str], list[str]]:
        """Pass 1: what each sample needs in pass 2 (or its rejection reason), and every text to count."""
        texts: list[str] = []
        want = texts.append
        jobs: list[tuple[Any, ...] | str] = []
        for row in batch:
            try:
                jobs.append(counter.prepare(row, want))
            except SampleRejected as exc:
                jobs.append(exc.reason)  # the reason only: a kept exception would keep its frames alive
        return jobs, texts

    def finish(batch: list[_Row], jobs: list[tuple[Any, ...] | str], lengths: Future[dict[str, int]]) -> None:
        """Pass 2 once the batch's texts are counted: summarise every sample, append the batch to the file."""
        nonlocal done
        text_lengths = lengths.result()
        keys: list[tuple[Any, ...]] = []
        summaries: list[_Summary] = []
        for row, job in zip(batch, jobs):
            if isinstance(job, str):
                skipped.append((*row[:7], job))
                continue
            try:
                summary = _summarise(counter.variants(row, job, text_lengths))
            except SampleRejected as exc:
                skipped.append((*row[:7], exc.reason))
                continue
            keys.append(row[:7])
            summaries.append(summary)
        if summaries:
            writer.write_table(_stats_table(keys, summaries, max_num_tokens_per_sample, max_latent_size))
        done += len(batch)
        if progress:
            progress(done, total)

    # The tokenizer releases the GIL: batch k is tokenised on a worker thread while this thread finishes
    # batch k-1 and reads and prepares batch k+1. Batches are still written in order.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-stats-encode") as pool, _gc_paused():
            previous: tuple[list[_Row], list[tuple[Any, ...] | str], Future[dict[str, int]]] | None = None
            rows = _iter_rows(ok_rows)
            while batch := list(islice(rows, batch_size)):
                jobs, texts = prepare(batch)
                lengths = pool.submit(encoder.lengths, texts)
                if previous is not None:
                    finish(*previous)
                previous = (batch, jobs, lengths)
            if previous is not None:
                finish(*previous)
    finally:
        writer.close()
    os.replace(tmp_stats, out / STATS_FILE)
    skipped_table = pa.table(list(zip(*skipped)) if skipped else [[]] * 8, schema=SKIPPED_SCHEMA)
    pq.write_table(skipped_table, out / SKIPPED_FILE)
    stats = pl.read_parquet(out / STATS_FILE)
    summary = summarise(stats, quarantined, pl.from_arrow(skipped_table))
    summary.write_parquet(out / SUMMARY_FILE)
    reasons: dict[str, int] = defaultdict(int)
    for *_, reason in skipped:
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
        texts_encoded=encoder.texts_encoded,
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
