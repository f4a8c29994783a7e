"""Per-format sample readers of the packed training dataset: one worker's units, in order, forever.

A :class:`UnitStream` walks the units :func:`bagel_core.plan.manifest.read_manifest` gives one
(rank, worker) for one group, in reading order, wrapping around after the last unit (one *pass*;
upstream prints ``<group> repeat in rank-<r> worker-<w>``). Every record has a *position*
``(unit, block, row)``:

* ``t2i``: unit = a parquet file, block = its row group, row = row within the row group;
* ``edit``: unit = one (file, row group), block = 0, row = row within that row group;
* ``vlm``: unit = one JSONL line, block = row = 0.

:meth:`UnitStream.cursor` turns a position into upstream's ``data_indexes`` (data-format.md 13):
``[file, row group, row]`` for T2I, ``[row-group unit, row]`` for edit, the line unit for VLM.

Parquet is read one row group at a time with pyarrow (the current row group is cached); a JSONL
file is read once per worker. Reading is *random access* by position (:meth:`UnitStream.read_at`),
which is what lets the dataset rebuild buffered samples exactly on resume.

:func:`decode_sample` turns a raw record into a :class:`LoadedSample`: decoded RGB images plus the
plan from the shared builders in :mod:`bagel_core.data.tokens` (``sample_t2i_plan``,
``sample_edit_plan``, ``build_vlm_plan``) drawn with the sample's own seeded RNG. Failures raise
:class:`SampleRejected` with a reason (the dataset counts them per group and reason); a row group or
file that cannot be read at all yields one :class:`ReadFailure` and the stream moves to the next unit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from bagel_core.config.dataset_config import GroupConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.data.transforms import to_rgb
from bagel_core.plan.sharding import DataUnit
from bagel_core.sequence.tokens import (
    SamplePlan,
    SampleRejected,
    TextIds,
    TokenCount,
    build_vlm_plan,
    count_tokens,
    sample_edit_plan,
    sample_t2i_plan,
    vlm_image_names,
)

log = logging.getLogger(__name__)

#: Columns read per task (extra columns are ignored, as upstream).
COLUMNS = {"t2i": ("image", "captions"), "edit": ("image_list", "instruction_list")}

Position = tuple[int, int, int]


@dataclass
class ReadFailure:
    """A record (or a whole row group / file) that could not be read; ``reason`` is for the counters."""

    reason: str


@dataclass
class LoadedSample:
    """One visit of one sample: where it came from, its plan and its decoded images.

    ``visit``: the group stream's read counter when it was read; with the dataset seed, rank and
    worker it seeds every random choice of this sample (plan, CFG dropout, timesteps), so the sample
    can be rebuilt bit-exactly from ``(group, position, visit)`` alone.
    """

    group_index: int
    group: str
    dataset: str
    position: Position
    cursor: Any
    visit: int
    plan: SamplePlan
    images: list[Image.Image]
    count: TokenCount
    source_file: str
    row_group: int
    row_index: int

    @property
    def estimate(self) -> int:
        return self.count.estimate

    def ref(self) -> dict[str, Any]:
        """What the resume state stores for a buffered sample."""
        return {"group": self.group, "position": list(self.position), "visit": self.visit}


@dataclass
class UnitStream:
    """One group's units for one (rank, worker), read in order forever (see module docstring)."""

    group: str
    task: str
    units: list[DataUnit]
    image_roots: dict[str, str] = field(default_factory=dict)  # VLM dataset name -> image root
    position: Position = (0, 0, 0)
    passes: int = 0
    reads: int = 0
    # how many of this worker's files may be unreadable or changed since planning before the run stops (0: no limit)
    max_bad_files: int = 0

    def __post_init__(self) -> None:
        if not self.units:
            raise DataError(
                f"{self.group}: this worker has no units; upstream's loader would loop forever printing the "
                "repeat line and the packer would hang. Rebuild the manifest with fewer workers or more data"
            )
        if self.task not in ("t2i", "edit", "vlm"):
            raise DataError(f"{self.group}: unknown task {self.task!r}")
        self._block_rows: dict[int, list[int] | None] = {}
        self._block_cache: tuple[tuple[str, int], list[dict[str, Any]]] | None = None
        self._lines: dict[str, list[str]] = {}
        self._failures: dict[int, str] = {}

    # ---- layout ---------------------------------------------------------------------------------
    def _rows(self, unit: int) -> list[int] | None:
        """Rows per block of a unit, or ``None`` when the unit cannot be opened (reason remembered)."""
        if unit in self._block_rows:
            return self._block_rows[unit]
        u = self.units[unit]
        rows: list[int]
        changed = self._changed_since_planning(u)
        if changed:
            return self._fail(unit, changed)
        try:
            if self.task == "vlm":
                lines = self._jsonl(u.source_file)
                if not 0 <= u.line < len(lines):
                    return self._fail(unit, f"JSONL has {len(lines)} lines, the manifest names line {u.line}")
                rows = [1]
            else:
                meta = pq.ParquetFile(u.source_file).metadata
                if self.task == "t2i":
                    rows = [meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)]
                elif 0 <= u.row_group < meta.num_row_groups:
                    rows = [meta.row_group(u.row_group).num_rows]
                else:
                    return self._fail(
                        unit,
                        f"file has {meta.num_row_groups} row groups, the manifest names row group {u.row_group} "
                        "(stale parquet_info?)",
                    )
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) / OSError
            return self._fail(unit, f"cannot open {type(exc).__name__}: {exc}")
        self._block_rows[unit] = rows
        return rows

    @staticmethod
    def _changed_since_planning(u: DataUnit) -> str:
        """Why ``u``'s file is not the one the plan saw (size or mtime differ, or it is gone); "" when it is."""
        if u.identity is None:
            return ""
        try:
            st = os.stat(u.source_file)
        except OSError as exc:
            return f"{u.source_file} is gone since planning ({exc.strerror})"
        size, mtime = u.identity
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return (
                f"{u.source_file} changed since planning (size {size} -> {st.st_size} bytes, mtime "
                f"{'changed' if st.st_mtime_ns != mtime else 'same'}); re-run the index and the plan"
            )
        return ""

    def _fail(self, unit: int, reason: str) -> None:
        """Remember why ``unit`` cannot be read (it is then skipped, counted by the caller) and stop the run once
        more files than ``max_bad_files`` failed: a few bad files are tolerable, many mean stale data."""
        self._failures[unit] = reason
        self._block_rows[unit] = None
        bad_files = sorted({self.units[u].source_file for u in self._failures})
        if self.max_bad_files and len(bad_files) > self.max_bad_files:
            raise DataError(
                f"{self.group}: {len(bad_files)} files of this worker are unreadable or changed since planning "
                f"(more than --max_bad_files {self.max_bad_files}), e.g. {self._failures[unit]}; re-run "
                "`bagel data index` and `bagel data plan` (or the data assets), or raise --max_bad_files"
            )
        log.warning("%s: skipping a unit: %s", self.group, reason)

    def _normalise(self, pos: Position) -> tuple[Position, bool]:
        """First readable position at or after ``pos`` (a failing unit is one position); wraps."""
        wrapped = False
        units_left = len(self.units) + 1  # more unit changes than that without a row: all units are empty
        unit, block, row = pos
        while True:
            if unit >= len(self.units):
                unit, block, row, wrapped = 0, 0, 0, True
            rows = self._rows(unit)
            if rows is None:
                return (unit, 0, 0), wrapped
            if block < len(rows) and row < rows[block]:
                return (unit, block, row), wrapped
            if block < len(rows) - 1:
                block, row = block + 1, 0
                continue
            unit, block, row = unit + 1, 0, 0
            units_left -= 1
            if units_left < 0:
                raise DataError(f"{self.group}: every unit of this worker is empty (no rows to read)")

    def _successor(self, pos: Position) -> Position:
        unit, block, row = pos
        if self._rows(unit) is None:
            return (unit + 1, 0, 0)
        return (unit, block, row + 1)

    def cursor(self, pos: Position) -> Any:
        """Upstream's ``data_indexes`` of a position (data-format.md 13)."""
        unit, block, row = pos
        if self.task == "t2i":
            return [unit, block, row]
        if self.task == "edit":
            return [unit, row]
        return unit

    def source(self, pos: Position) -> tuple[str, str, int, int]:
        """(dataset, source_file, row_group, row_index) of a position, in the index's key convention."""
        unit, block, row = pos
        u = self.units[unit]
        if self.task == "t2i":
            return u.dataset, u.source_file, block, row
        if self.task == "edit":
            return u.dataset, u.source_file, u.row_group, row
        return u.dataset, u.source_file, -1, u.line

    # ---- reading --------------------------------------------------------------------------------
    def _jsonl(self, path: str) -> list[str]:
        if path not in self._lines:
            with open(path, "r", encoding="utf-8") as handle:
                self._lines[path] = handle.readlines()
        return self._lines[path]

    def _block(self, unit: int, block: int) -> list[dict[str, Any]]:
        u = self.units[unit]
        rg = block if self.task == "t2i" else u.row_group
        key = (u.source_file, rg)
        if self._block_cache is None or self._block_cache[0] != key:
            columns = list(COLUMNS[self.task])
            # one thread: DataLoader workers are the parallelism (and are forked processes)
            table = pq.ParquetFile(u.source_file).read_row_group(rg, columns=columns, use_threads=False)
            self._block_cache = (key, table.to_pylist())
        return self._block_cache[1]

    def read_at(self, pos: Position) -> dict[str, Any] | ReadFailure:
        """The raw record at ``pos`` (a row dict, or ``{"line": text, "root": dir}`` for VLM)."""
        unit, block, row = pos
        if self._rows(unit) is None:
            return ReadFailure(f"unit unreadable: {self._failures.get(unit, 'unknown error')}")
        u = self.units[unit]
        if self.task == "vlm":
            return {"line": self._jsonl(u.source_file)[u.line], "root": self.image_roots.get(u.dataset, "")}
        try:
            return self._block(unit, block)[row]
        except (OSError, ValueError, KeyError) as exc:
            return ReadFailure(f"row group read error ({type(exc).__name__}: {str(exc)[:120]})")

    def advance(self) -> tuple[Position, int, bool]:
        """Step to the next record without reading it: ``(position, visit, wrapped)``, so a caller can
        pass over a known-bad record (the index's quarantine) unread.

        ``wrapped``: this record starts a new pass (the previous pass just ended).
        """
        pos, wrapped = self._normalise(self.position)
        visit = self.reads
        self.reads += 1
        if wrapped:
            self.passes += 1
        self.position = self._successor(pos)
        return pos, visit, wrapped

    def next(self) -> tuple[Position, dict[str, Any] | ReadFailure, int, bool]:
        """Read the next record: ``(position, record or failure, visit, wrapped)`` (see :meth:`advance`)."""
        pos, visit, wrapped = self.advance()
        return pos, self.read_at(pos), visit, wrapped

    def units_digest(self) -> str:
        """Fingerprint of this worker's unit list: a resume state only fits the manifest it was saved with."""
        digest = hashlib.sha256()
        for u in self.units:
            digest.update(f"{u.dataset}|{u.source_file}|{u.row_group}|{u.line}\n".encode())
        return digest.hexdigest()[:16]

    def state(self) -> dict[str, Any]:
        return {
            "position": list(self.position),
            "passes": self.passes,
            "reads": self.reads,
            "units": self.units_digest(),
        }

    def load(self, state: dict[str, Any]) -> None:
        if state.get("units") != self.units_digest():
            raise ConfigError(
                f"{self.group}: the data resume state was saved with a different unit list for this worker "
                "(manifest rebuilt, data changed or other num_used_data); exact resume is impossible"
            )
        pos = tuple(int(v) for v in state["position"])
        if len(pos) != 3 or not (0 <= pos[0] <= len(self.units)):
            raise DataError(f"{self.group}: resume position {state['position']} does not fit {len(self.units)} units")
        self.position = pos  # type: ignore[assignment]
        self.passes = int(state["passes"])
        self.reads = int(state["reads"])


# ---- decoding ------------------------------------------------------------------------------------
def decode_image(data: Any, what: str) -> Image.Image:
    """Encoded bytes -> fully decoded RGB image; any failure is a :class:`SampleRejected`.

    The image is decoded from an in-memory buffer and not closed: closing would discard the decoded
    pixels, so an RGB image (most of them) would need a full copy to survive it; a buffer holds no file.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise SampleRejected(f"{what}: not binary image bytes ({type(data).__name__})")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleRejected(f"image decode error ({type(exc).__name__})") from exc


def image_header(data: Any, what: str) -> Image.Image:
    """Encoded bytes -> the image, opened but not decoded: its size and mode come from the header alone (it
    decodes on first use of its pixels)."""
    if not isinstance(data, (bytes, bytearray)):
        raise SampleRejected(f"{what}: not binary image bytes ({type(data).__name__})")
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleRejected(f"image decode error ({type(exc).__name__})") from exc


def open_image_file(path: Path) -> Image.Image:
    """An image file -> fully decoded RGB image (read whole, then decoded as :func:`decode_image` does)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise SampleRejected("image file not found") from exc
    except OSError as exc:
        raise SampleRejected(f"image decode error ({type(exc).__name__})") from exc
    return decode_image(data, str(path))


def plan_rng(seed: int, rank: int, worker: int, group: str, visit: int, purpose: str) -> random.Random:
    """The explicitly seeded RNG of one sample visit (``purpose``: ``plan`` or ``pack``)."""
    return random.Random(f"bagel-data|{seed}|{rank}|{worker}|{group}|{visit}|{purpose}")


def decode_sample(
    stream: UnitStream,
    group_index: int,
    group: GroupConfig,
    pos: Position,
    record: dict[str, Any],
    visit: int,
    ids_of: TextIds,
    rng: random.Random,
    cached: Callable[[str, int, int, int], bool] | None = None,
) -> LoadedSample:
    """Raw record -> :class:`LoadedSample` (decoded images + plan); raises :class:`SampleRejected`.

    ``cached(source_file, row_group, row_index, image)``: whether the latent cache holds that image's moments.
    A text-to-image sample's only image is then opened for its size alone and never decoded: the trainer
    takes its latent from the cache, and the cache was built by decoding this very (unchanged) file."""
    task = stream.task
    dataset, source_file, row_group, row_index = stream.source(pos)
    if task == "t2i":
        if cached is not None and cached(source_file, row_group, row_index, 0):
            image = image_header(record.get("image"), "image")
        else:
            image = decode_image(record.get("image"), "image")
        plan = sample_t2i_plan(record.get("captions"), image.size, group.image_transform_args, ids_of, rng)
        images = [image]
    elif task == "edit":
        image_list, instructions = record.get("image_list"), record.get("instruction_list")
        if not isinstance(image_list, list) or not isinstance(instructions, list):
            raise SampleRejected("image_list / instruction_list is not a list")
        images = [decode_image(b, f"image_list[{k}]") for k, b in enumerate(image_list)]
        plan = sample_edit_plan(
            instructions,
            [im.size for im in images],
            group.image_transform_args,
            group.vit_image_transform_args,
            ids_of,
            rng,
        )
    else:
        try:
            rec = json.loads(record["line"])
        except json.JSONDecodeError as exc:
            raise SampleRejected(f"line is not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise SampleRejected("the JSONL line is not a JSON object")
        names = vlm_image_names(rec)
        root = Path(record["root"])
        images = [open_image_file(root / name) for name in names]  # an absolute name overrides the root
        plan = build_vlm_plan(rec, [im.size for im in images], group.image_transform_args, ids_of)
    return LoadedSample(
        group_index=group_index,
        group=stream.group,
        dataset=dataset,
        position=pos,
        cursor=stream.cursor(pos),
        visit=visit,
        plan=plan,
        images=images,
        count=count_tokens(plan),
        source_file=source_file,
        row_group=row_group,
        row_index=row_index,
    )


def make_ids_of(tokenizer: Any, cache_size: int = 4096) -> Callable[[str], Sequence[int]]:
    """``text -> ids`` exactly as the statistics tokenise (backend ``encode``, no special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cache: dict[str, tuple[int, ...]] = {}

    def ids_of(text: str) -> Sequence[int]:
        hit = cache.get(text)
        if hit is not None:
            return hit
        if backend is not None:
            ids = tuple(backend.encode(text, add_special_tokens=False).ids)
        else:
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        if len(cache) >= cache_size:
            cache.clear()
        cache[text] = ids
        return ids

    return ids_of
