"""Per-sample validation rules for the three BAGEL formats (data-format.md section 4).

Each ``check_*`` function takes one sample's raw cells and returns a :class:`SampleResult`; it never
raises for bad data. The first problem found (images first, in sample order, then texts) becomes
the quarantine ``reason`` class; the message names the column/key and what upstream would do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from bagel_core.index.probe import ImageInfo, ProbeError, probe_bytes, probe_file

# Reason classes of sample-level problems (image classes live in probe.py).
CAPTION_NOT_JSON = "caption_not_json"
CAPTION_EMPTY = "caption_empty"
CAPTION_WRONG_TYPE = "caption_wrong_type"
INVALID_UTF8 = "invalid_utf8"
EDIT_TOO_FEW_IMAGES = "edit_too_few_images"
EDIT_COUNT_MISMATCH = "edit_count_mismatch"
INSTRUCTION_INVALID = "instruction_invalid"
JSON_INVALID = "json_invalid"
RECORD_INVALID = "record_invalid"
CONVERSATION_INVALID = "conversation_invalid"
NO_LOSS = "no_loss"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
VIDEO_MISSING = "video_missing"
VIDEO_PLACEHOLDER_MISSING = "video_placeholder_missing"

UNKNOWN_SIZE = (-1, -1)
_IMAGE_TOKEN = "<image>"
_VIDEO_TOKEN = "<video>"
_IMAGE_TOKEN_RE = re.compile(re.escape(_IMAGE_TOKEN))


@dataclass(slots=True)
class SampleResult:
    """Everything the index stores about one sample besides its location."""

    sizes: list[tuple[int, int]] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    image_bytes: int = 0
    num_texts: int = 0
    text_chars: int = 0
    image_paths: list[str] = field(default_factory=list)
    video_path: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, reason: str, message: str) -> None:
        self.problems.append((reason, message))

    @property
    def reason(self) -> str | None:
        return self.problems[0][0] if self.problems else None

    @property
    def message(self) -> str | None:
        if not self.problems:
            return None
        extra = len(self.problems) - 1
        return self.problems[0][1] + (f" (+{extra} more problem(s): {self.problems[1][0]})" if extra else "")

    def add_image(self, info: ImageInfo) -> None:
        self.sizes.append((info.width, info.height))
        self.modes.append(info.mode)
        self.image_bytes += info.nbytes

    def add_failed_image(self, what: str, err: ProbeError, nbytes: int = 0) -> None:
        self.sizes.append(UNKNOWN_SIZE)
        self.modes.append("")
        self.image_bytes += nbytes
        self.fail(err.reason, f"{what}: {err.message}")


def _text(value: Any, what: str, result: SampleResult) -> str | None:
    """Decode a string cell that may arrive as bytes (fallback reader keeps invalid UTF-8 visible)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            result.fail(
                INVALID_UTF8, f"{what} is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 4]!r})"
            )
            return None
    return value


def _probe_cell(data: Any, what: str, result: SampleResult, max_pixels: int, full_decode: bool) -> None:
    try:
        result.add_image(probe_bytes(data, max_pixels, full_decode))
    except ProbeError as err:
        result.add_failed_image(what, err, len(data) if data is not None else 0)


# ---- T2I ------------------------------------------------------------------------------------------
def check_t2i(image: Any, captions: Any, max_pixels: int, full_decode: bool = False) -> SampleResult:
    """``image`` (encoded bytes) + ``captions`` (JSON object of caption strings)."""
    result = SampleResult()
    _probe_cell(image, "column 'image'", result, max_pixels, full_decode)
    if captions is None:
        result.fail(CAPTION_EMPTY, "column 'captions' is null")
        return result
    text = _text(captions, "column 'captions'", result)
    if text is None:
        return result
    if not text.strip():
        result.fail(CAPTION_EMPTY, "column 'captions' is an empty string")
        return result
    try:
        obj = json.loads(text)
    except ValueError as exc:
        result.fail(CAPTION_NOT_JSON, f"column 'captions' is not JSON ({exc}); starts with {text[:60]!r}")
        return result
    if not isinstance(obj, dict):
        result.fail(
            CAPTION_WRONG_TYPE,
            f"column 'captions' is a JSON {type(obj).__name__}, expected an object of caption strings "
            "(a list crashes the upstream loader worker)",
        )
        return result
    if not obj:
        result.fail(CAPTION_EMPTY, "column 'captions' is {} (upstream would train on a single space)")
        return result
    bad = [k for k, v in obj.items() if not isinstance(v, str)]
    if bad:
        result.fail(CAPTION_WRONG_TYPE, f"column 'captions': value of key {bad[0]!r} is not a string")
        return result
    if not any(v.strip() for v in obj.values()):
        result.fail(CAPTION_EMPTY, f"column 'captions': all {len(obj)} caption(s) are blank")
        return result
    result.num_texts = len(obj)
    result.text_chars = sum(len(v) for v in obj.values())
    return result


# ---- editing --------------------------------------------------------------------------------------
def check_edit(image_list: Any, instruction_list: Any, max_pixels: int, full_decode: bool = False) -> SampleResult:
    """``image_list`` (N >= 2 images) + ``instruction_list`` (N-1 lists of alternative phrasings)."""
    result = SampleResult()
    if image_list is None:
        result.fail(EDIT_TOO_FEW_IMAGES, "column 'image_list' is null")
        return result
    for k, data in enumerate(image_list):
        _probe_cell(data, f"column 'image_list'[{k}]", result, max_pixels, full_decode)
    n = len(image_list)
    if n < 2:
        result.fail(EDIT_TOO_FEW_IMAGES, f"column 'image_list' has {n} image(s); an edit needs at least 2")
    if instruction_list is None:
        result.fail(INSTRUCTION_INVALID, "column 'instruction_list' is null")
        return result
    if n >= 2 and len(instruction_list) != n - 1:
        result.fail(
            EDIT_COUNT_MISMATCH,
            f"{n} images need {n - 1} entries in 'instruction_list', found {len(instruction_list)} "
            "(upstream fails this row: 'index out of bounds', issue #268)",
        )
    for k, alternatives in enumerate(instruction_list):
        if not alternatives:
            result.fail(INSTRUCTION_INVALID, f"column 'instruction_list'[{k}] is empty or null (no phrasing)")
            continue
        texts = [_text(a, f"column 'instruction_list'[{k}]", result) for a in alternatives]
        if any(t is None for t in texts):
            if not result.problems or result.problems[-1][0] != INVALID_UTF8:
                result.fail(INSTRUCTION_INVALID, f"column 'instruction_list'[{k}] contains a null phrasing")
            continue
        if not any(t.strip() for t in texts):  # type: ignore[union-attr]
            result.fail(INSTRUCTION_INVALID, f"column 'instruction_list'[{k}]: all phrasings are blank")
            continue
        result.num_texts += len(texts)
        result.text_chars += sum(len(t) for t in texts)  # type: ignore[arg-type]
    return result


# ---- VLM ------------------------------------------------------------------------------------------
def check_vlm_line(raw: bytes, data_dir: str, max_pixels: int, full_decode: bool = False) -> SampleResult:
    """One JSONL line: UTF-8, JSON object, conversations, image files, ``<image>`` placeholders."""
    result = SampleResult()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        result.fail(INVALID_UTF8, f"line is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 4]!r})")
        return result
    if not text.strip():
        result.fail(JSON_INVALID, "blank line (upstream json.loads fails and skips it)")
        return result
    try:
        record = json.loads(text)
    except ValueError as exc:
        result.fail(JSON_INVALID, f"line is not valid JSON ({exc}); starts with {text[:60]!r}")
        return result
    if not isinstance(record, dict):
        result.fail(RECORD_INVALID, f"line is a JSON {type(record).__name__}, expected an object")
        return result

    images = record.get("image")
    if images is not None and not isinstance(images, list):
        images = [images]
    if images is not None and not all(isinstance(p, str) and p for p in images):
        result.fail(RECORD_INVALID, "key 'image' must be a path string or a list of path strings")
        return result
    for k, rel in enumerate(images or []):
        path = os.path.join(data_dir, rel)
        result.image_paths.append(path)
        try:
            result.add_image(probe_file(path, max_pixels, full_decode))
        except ProbeError as err:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = 0
            result.add_failed_image(f"key 'image'[{k}] ({rel})", err, size)

    video = record.get("video") if images is None else None
    if video is not None:
        if not isinstance(video, str) or not video:
            result.fail(RECORD_INVALID, "key 'video' must be a path string")
        elif not os.path.exists(os.path.join(data_dir, video)):
            result.fail(VIDEO_MISSING, f"key 'video': {os.path.join(data_dir, video)} does not exist")
        else:
            result.video_path = os.path.join(data_dir, video)

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        result.fail(CONVERSATION_INVALID, "key 'conversations' must be a non-empty list of {from, value} turns")
        return result
    placeholders = 0
    has_loss = False
    for k, turn in enumerate(conversations):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            result.fail(
                CONVERSATION_INVALID, f"key 'conversations'[{k}] must be an object with string 'from' and 'value'"
            )
            return result
        value = turn["value"]
        result.num_texts += 1
        result.text_chars += len(value)
        if turn["from"] == "human":
            placeholders += len(_IMAGE_TOKEN_RE.findall(value))
        elif turn["from"] == "gpt" and value.strip():
            has_loss = True
    if video is not None and _VIDEO_TOKEN not in conversations[0]["value"]:
        result.fail(VIDEO_PLACEHOLDER_MISSING, "video record without '<video>' in the first turn (upstream skips it)")
    n_images = len(images or [])
    if images is not None and placeholders != n_images:
        result.fail(
            IMAGE_PLACEHOLDER_MISMATCH,
            f"{n_images} image(s) but {placeholders} '<image>' placeholder(s) in human turns "
            "(upstream drops surplus placeholders and never places surplus images)",
        )
    elif images is None and video is None and placeholders:
        result.fail(IMAGE_PLACEHOLDER_MISMATCH, f"no 'image' key but {placeholders} '<image>' placeholder(s)")
    if not has_loss:
        result.fail(NO_LOSS, "no non-empty 'gpt' turn: nothing to train on (upstream: 'No loss defined, skipped.')")
    return result
