"""Vectorised fast path of the indexer: the checks of :mod:`checks` / :mod:`probe` on whole Arrow batches.

Why: the per-row path costs ~25 us of Python per sample (a Pillow-free header parse, ``json.loads``,
a result object, list appends), 40-50x a raw DuckDB scan of the same files. Almost every real
sample is a plain, complete PNG or JPEG with a JSON object of caption strings, and for those the
verdict can be computed for a whole batch at once:

* **PNG**: signature, ``IHDR`` tag, its CRC (a table-driven CRC-32 over the 17 bytes, vectorised
  over rows), width/height/bit depth/colour type at fixed offsets, and ``IEND`` + its CRC as the
  last 8 bytes;
* **JPEG**: ``SOI``, then the marker walk of :func:`probe.fast_header` advanced for all rows at once
  (a few steps: APPn, DQT, ... until ``SOFn``), and ``EOI`` as the last two bytes;
* pixel cap (``0 < w*h <= max_pixels``) on the declared size, as before any decode;
* **captions**: UTF-8 validated for the whole column by Arrow, then one C-level JSON scan per row
  (``json``'s own scanner, so acceptance is exactly ``json.loads``'s) and the type/blank checks;
* **edit texts**: list lengths and phrasings per row in a tight loop.

The fast path only ever *accepts*: a row is marked fast-ok only when the per-row path would return
exactly the same sizes, modes, byte and text counts with no problem. Everything else (other
formats, a trailer with padding, bad bytes, nulls, odd JSON, ...) goes through the per-row checks,
so reasons and messages of bad input are unchanged by construction; a differential test compares
the two paths on every bad-input fixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view

#: Mode names by code (the index stores the strings); PNG colour types and JPEG layer counts map here.
MODES = ("L", "RGB", "P", "LA", "RGBA", "CMYK")
_PNG_MODE_CODE = np.full(256, -1, np.int8)
for _colour, _name in {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}.items():
    _PNG_MODE_CODE[_colour] = MODES.index(_name)
_JPEG_MODE_CODE = np.full(256, -1, np.int8)
for _layers, _name in {1: "L", 3: "RGB", 4: "CMYK"}.items():
    _JPEG_MODE_CODE[_layers] = MODES.index(_name)

_PNG_SIG = np.frombuffer(b"\x89PNG\r\n\x1a\n", np.uint8)
_IHDR = np.frombuffer(b"IHDR", np.uint8)
_IEND_TAIL = np.frombuffer(b"IEND\xaeB`\x82", np.uint8)
_JPEG_SOF = np.zeros(256, bool)
_JPEG_SOF[[m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)]] = True
_JPEG_RST = np.zeros(256, bool)  # standalone markers the walk steps over (TEM, RSTn, SOI)
_JPEG_RST[[0x01, *range(0xD0, 0xD9)]] = True
#: Marker-walk steps before a JPEG is left to the per-row path (typical files need 3-6).
_JPEG_MAX_STEPS = 48


def _crc_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _crc_table()


def _crc32_rows(block: np.ndarray) -> np.ndarray:
    """zlib.crc32 of each row of a (rows, k) uint8 matrix."""
    crc = np.full(block.shape[0], 0xFFFFFFFF, np.uint32)
    for j in range(block.shape[1]):
        crc = _CRC_TABLE[(crc ^ block[:, j]) & 0xFF] ^ (crc >> np.uint32(8))
    return crc ^ np.uint32(0xFFFFFFFF)


def _be(block: np.ndarray) -> np.ndarray:
    """Big-endian unsigned integer of each row of a (rows, k) uint8 matrix, as uint64."""
    out = np.zeros(block.shape[0], np.uint64)
    for j in range(block.shape[1]):
        out = (out << np.uint64(8)) | block[:, j].astype(np.uint64)
    return out


@dataclass
class BulkImages:
    """Fast-path verdict per element of a binary array; ``ok`` False means: ask the per-row probe."""

    ok: np.ndarray  # bool
    width: np.ndarray  # int32
    height: np.ndarray  # int32
    mode: np.ndarray  # int8 code into MODES
    nbytes: np.ndarray  # int64


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(starts, lengths, data bytes) of a binary / large_binary array without copying the data."""
    if pa.types.is_binary(arr.type):
        odt = np.int32
    elif pa.types.is_large_binary(arr.type):
        odt = np.int64
    else:
        return None
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], odt, count=n + 1, offset=arr.offset * np.dtype(odt).itemsize).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    return offsets[:-1], offsets[1:] - offsets[:-1], data


def _gather(data: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) bytes from ``starts`` (a copy of k-byte windows: ~4x faster than an index matrix).
    Starts are clipped into the buffer: callers mask rows shorter than they need."""
    if len(data) < k:
        data = np.concatenate([data, np.zeros(k - len(data), np.uint8)])
    windows = sliding_window_view(data, k)
    return windows[np.clip(starts, 0, len(windows) - 1)]


@dataclass
class _ByteRows:
    """Where each image's leading bytes and its last bytes lie in flat uint8 buffers.

    For whole images both are the image itself; the SQL scan hands over only a prefix (``avail``
    bytes) and the last 8 bytes, and a walk that needs bytes past the prefix is left undecided.
    """

    data: np.ndarray  # uint8 buffer holding the leading bytes
    starts: np.ndarray  # int64: where each image's leading bytes start in ``data``
    avail: np.ndarray  # int64: how many leading bytes are there
    lens: np.ndarray  # int64: full encoded size
    tail_data: np.ndarray  # uint8 buffer holding the last bytes
    tail_end: np.ndarray  # int64: index just past each image's last byte in ``tail_data``
    valid: np.ndarray  # bool: not null


def _valid(arr: pa.Array) -> np.ndarray:
    return np.ones(len(arr), bool) if arr.null_count == 0 else np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))


def probe_images(arr: pa.Array, max_pixels: int) -> BulkImages:
    """Header verdict for every element of a binary array (the fast part of :func:`probe.probe_bytes`)."""
    parts = _binary_parts(arr)
    if parts is None or len(arr) == 0:
        return _empty(len(arr))
    starts, lens, data = parts
    return _probe(_ByteRows(data, starts, lens, lens, data, starts + lens, _valid(arr)), max_pixels)


def probe_heads(head: pa.Array, tail: pa.Array, lens: np.ndarray, max_pixels: int) -> BulkImages:
    """Header verdicts from each image's first bytes (``head``), last 8 bytes (``tail``) and full size."""
    hp, tp = _binary_parts(head), _binary_parts(tail)
    if hp is None or tp is None or len(head) == 0:
        return _empty(len(head))
    valid = _valid(head) & _valid(tail)
    lens = np.asarray(lens, np.int64)
    return _probe(_ByteRows(hp[2], hp[0], hp[1], lens, tp[2], tp[0] + tp[1], valid), max_pixels)


def _empty(n: int) -> BulkImages:
    return BulkImages(
        np.zeros(n, bool), np.zeros(n, np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int8), np.zeros(n, np.int64)
    )


def _probe(b: _ByteRows, max_pixels: int) -> BulkImages:
    n = len(b.starts)
    res = _empty(n)
    res.nbytes = b.lens
    data, starts, avail, lens = b.data, b.starts, b.avail, b.lens
    cap = np.uint64(min(max(max_pixels, 0), (1 << 64) - 1))
    first = _gather(data, starts, 3)
    # ---- PNG: fixed offsets -----------------------------------------------------------------------
    png = np.flatnonzero(
        b.valid & (lens >= 33) & (avail >= 33) & (first[:, 0] == 0x89) & (first[:, 1] == 0x50) & (first[:, 2] == 0x4E)
    )
    if len(png):
        head = _gather(data, starts[png], 33)
        tail = _gather(b.tail_data, b.tail_end[png] - 8, 8)
        w, h = _be(head[:, 16:20]), _be(head[:, 20:24])
        depth, colour = head[:, 24], head[:, 25]
        mode = _PNG_MODE_CODE[colour]
        good = (
            (head[:, :8] == _PNG_SIG).all(1)
            & (head[:, 12:16] == _IHDR).all(1)
            & (_crc32_rows(head[:, 12:29]) == _be(head[:, 29:33]).astype(np.uint32))
            & (mode >= 0)
            & ((depth == 8) | ((colour == 3) & ((depth == 1) | (depth == 2) | (depth == 4))))
            & (w > 0)
            & (h > 0)
            & (w * h <= cap)  # w, h < 2**32: the product fits uint64 exactly
            & (tail == _IEND_TAIL).all(1)
        )
        rows = png[good]
        res.ok[rows] = True
        res.width[rows], res.height[rows], res.mode[rows] = w[good], h[good], mode[good]
    # ---- JPEG: the marker walk, one step for all rows at a time ---------------------------------------
    jpg = np.flatnonzero(
        b.valid & (lens >= 4) & (avail >= 4) & (first[:, 0] == 0xFF) & (first[:, 1] == 0xD8) & (first[:, 2] == 0xFF)
    )
    if len(jpg):
        tail = _gather(b.tail_data, b.tail_end[jpg] - 2, 2)
        jpg = jpg[(tail[:, 0] == 0xFF) & (tail[:, 1] == 0xD9)]  # EOI last: else the per-row path decides
    pos = np.full(len(jpg), 2, np.int64)
    for _ in range(_JPEG_MAX_STEPS):
        if not len(jpg):
            break
        s, room_to = starts[jpg], avail[jpg]
        room = pos + 4 <= room_to
        seg_head = _gather(data, s + pos, 4)
        marker = seg_head[:, 1]
        alive = room & (seg_head[:, 0] == 0xFF) & (marker != 0xDA) & (marker != 0xD9)
        fill = alive & (marker == 0xFF)
        rst = alive & ~fill & _JPEG_RST[marker]
        seg = alive & ~fill & ~rst
        sof = seg & _JPEG_SOF[marker]
        if sof.any():
            rows = np.flatnonzero(sof)
            f = _gather(data, s[rows] + pos[rows] + 4, 6)
            height = (f[:, 1].astype(np.int64) << 8) | f[:, 2]
            width = (f[:, 3].astype(np.int64) << 8) | f[:, 4]
            mode = _JPEG_MODE_CODE[f[:, 5]]
            good = (
                (pos[rows] + 10 <= room_to[rows])
                & (f[:, 0] == 8)
                & (mode >= 0)
                & (height > 0)
                & (width > 0)
                & (width.astype(np.uint64) * height.astype(np.uint64) <= cap)
            )
            done = jpg[rows[good]]
            res.ok[done] = True
            res.width[done], res.height[done], res.mode[done] = width[good], height[good], mode[good]
        length = (seg_head[:, 2].astype(np.int64) << 8) | seg_head[:, 3]
        pos = pos + np.where(fill, 1, np.where(rst, 2, 2 + length))
        keep = fill | rst | (seg & ~sof)  # still walking; everything else is done or left to the per-row path
        jpg, pos = jpg[keep], pos[keep]
    return res


def list_rows(images: BulkImages, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of a list-of-images column whose images are ``[starts, ends)`` of ``images``:
    (every image of the row accepted, encoded bytes of the row)."""
    bad = np.concatenate([[0], np.cumsum(~images.ok, dtype=np.int64)])
    nbytes = np.concatenate([[0], np.cumsum(images.nbytes, dtype=np.int64)])
    return bad[ends] == bad[starts], nbytes[ends] - nbytes[starts]


def flat_indices(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without the Python loop."""
    counts = np.asarray(counts, np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, np.int64) - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)


# ---- texts ----------------------------------------------------------------------------------------
_SCAN = json.JSONDecoder().scan_once  # the C scanner json.loads uses: same acceptance, no wrappers


def captions_ok(values: list[str | None]) -> tuple[list[bool], list[int], list[int]]:
    """(fast-ok, num_texts, text_chars) per T2I ``captions`` cell: a JSON object of >= 1 caption strings,
    not all blank, exactly as :func:`checks.check_t2i` accepts it (anything else: False)."""
    oks: list[bool] = []
    nums: list[int] = []
    chars: list[int] = []
    scan = _SCAN
    for text in values:
        ok, num, total = False, 0, 0
        if text is not None and text[:1] == "{":  # leading whitespace etc.: the per-row path
            try:
                obj, end = scan(text, 0)
            except (StopIteration, ValueError, RecursionError):
                obj, end = None, -1
            if end == len(text) and type(obj) is dict and obj:
                blank = True
                for v in obj.values():
                    if type(v) is not str:
                        blank = True
                        break
                    total += len(v)
                    if blank and v and not v.isspace():
                        blank = False
                else:
                    ok, num = not blank, len(obj)
        oks.append(ok)
        nums.append(num if ok else 0)
        chars.append(total if ok else 0)
    return oks, nums, chars


def instructions_ok(n_images: list[int], values: list[Any]) -> tuple[list[bool], list[int], list[int]]:
    """(fast-ok, num_texts, text_chars) per edit row whose ``n_images`` images all passed: list lengths
    and phrasings as :func:`checks.check_edit` accepts them (anything else: False)."""
    oks: list[bool] = []
    nums: list[int] = []
    chars: list[int] = []
    for n, alts_list in zip(n_images, values):
        ok, num, total = False, 0, 0
        if n >= 2 and alts_list is not None and len(alts_list) == n - 1:
            ok = True
            for alts in alts_list:
                if not alts or None in alts:
                    ok = False
                    break
                blank = True
                for t in alts:
                    total += len(t)
                    if blank and t and not t.isspace():
                        blank = False
                if blank:
                    ok = False
                    break
                num += len(alts)
        oks.append(ok)
        nums.append(num if ok else 0)
        chars.append(total if ok else 0)
    return oks, nums, chars


def as_strings(arr: pa.Array) -> list[Any] | None:
    """Python values of a (nested) binary/string column as ``str``, or None if any value is not UTF-8."""

    def stringy(t: pa.DataType) -> pa.DataType:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return pa.list_(stringy(t.value_type))
        return t

    try:
        return arr.cast(stringy(arr.type)).to_pylist()  # Arrow validates UTF-8 on the cast
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
