"""Image probing for the indexer: size and mode from the header, a full decode only when needed.

Why not decode everything: decoding costs ~5-50x a header parse and the index only needs
``(width, height, mode)`` to count tokens. A header alone cannot prove the pixel data is intact, so
two cheap extra checks run per image:

* the **pixel cap** is checked on the declared size *before* any decode, which turns a
  decompression bomb (a few bytes declaring 100k x 100k pixels) into a quarantine entry;
* the **trailer** of PNG (``IEND``) and JPEG (``EOI``) is checked; only when it is missing (a
  truncated file, or a file with trailing junk) is the image fully decoded to tell the two apart.

Formats whose header Pillow does not fully trust (anything outside :data:`HEADER_FORMATS`) are
always decoded. Failures raise :class:`ProbeError` with a stable ``reason`` class for quarantine.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from typing import BinaryIO, NamedTuple

from PIL import Image, ImageFile

#: Upstream sets ``Image.MAX_IMAGE_PIXELS = 200_000_000``; anything above is refused before decode.
DEFAULT_MAX_PIXELS = 200_000_000

#: Formats whose header gives size and mode reliably (no decode needed to trust them).
HEADER_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM"})

# Reason classes (stable strings: tests, checks and dashboards group by them).
IMAGE_MISSING = "image_missing"
IMAGE_EMPTY = "image_empty"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_TRUNCATED = "image_truncated"
IMAGE_TOO_LARGE = "image_too_large"

_PNG_IEND = b"IEND\xaeB`\x82"
#: Bytes read for the fast header path (JPEG SOF is usually in the first KB; EXIF can push it on).
_HEAD_BYTES = 1 << 16
_JPEG_EOI = b"\xff\xd9"
#: Pillow calls below toggle process globals (``warnings`` filters, ``ImageFile.LOAD_TRUNCATED_IMAGES``);
#: the indexer may probe on several threads, so those sections run one at a time (the rare slow path).
_PIL_LOCK = threading.RLock()


class ProbeError(Exception):
    """An image that cannot be used; ``reason`` is the quarantine class, the message the detail."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ImageInfo(NamedTuple):
    width: int
    height: int
    mode: str
    format: str
    nbytes: int


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
#: JPEG start-of-frame markers (SOF0..SOF15 without DHT, JPG and DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def fast_header(head: bytes | memoryview) -> tuple[int, int, str, str] | None:
    """(width, height, mode, format) of a plain 8-bit PNG or JPEG from its first bytes, else None.

    Why: Pillow's ``Image.open`` costs ~20 us per image, most of it generic plugin machinery; these
    two formats are the bulk of training data and their size sits at a fixed place (PNG ``IHDR``)
    or a few markers in (JPEG ``SOFn``). Anything unusual returns None and Pillow decides;
    tests check the result equals Pillow's for every mode we accept.
    """
    if head[:8] == _PNG_SIGNATURE:
        if len(head) < 33 or head[12:16] != b"IHDR":
            return None
        if zlib.crc32(head[12:29]) != struct.unpack_from(">I", head, 29)[0]:
            return None
        width, height = struct.unpack_from(">II", head, 16)
        depth, colour = head[24], head[25]
        mode = _PNG_MODES.get(colour)
        if mode is None or not (depth == 8 or (colour == 3 and depth in (1, 2, 4))):
            return None
        return width, height, mode, "PNG"
    if head[:3] == b"\xff\xd8\xff":
        i, n = 2, len(head)
        while i + 4 <= n:
            if head[i] != 0xFF:
                return None
            marker = head[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                i += 2
                continue
            if marker == 0xDA or marker == 0xD9:  # scan data before any frame header
                return None
            length = struct.unpack_from(">H", head, i + 2)[0]
            if marker in _JPEG_SOF:
                if i + 10 > n:
                    return None
                precision, height, width, layers = struct.unpack_from(">BHHB", head, i + 4)
                mode = _JPEG_MODES.get(layers)
                if precision != 8 or mode is None or height == 0:
                    return None
                return width, height, mode, "JPEG"
            i += 2 + length
    return None


def _tail(fp: BinaryIO, size: int, n: int) -> bytes:
    fp.seek(max(0, size - n))
    return fp.read(n)


def _trailer_ok(fmt: str, fp: BinaryIO, size: int) -> bool:
    """True when the file ends like a complete PNG/JPEG (other formats: not checked)."""
    if fmt == "PNG":
        return _PNG_IEND in _tail(fp, size, 32)
    if fmt in ("JPEG", "MPO"):
        # EOI is normally the last two bytes; tolerate a little zero/space padding.
        return _JPEG_EOI in _tail(fp, size, 64).rstrip(b"\x00\r\n ")[-2:]
    return True


def _full_decode(fp: BinaryIO, fmt_hint: str) -> None:
    """Decode every pixel with truncation treated as an error (whatever another module set)."""
    fp.seek(0)
    with _PIL_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(fp) as im:
                    im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def probe_stream(
    fp: BinaryIO, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False, head: bytes | None = None
) -> ImageInfo:
    """Probe an image held in a seekable binary stream of ``size`` bytes (``head``: its first bytes, if at hand)."""
    if size == 0:
        raise ProbeError(IMAGE_EMPTY, "image has 0 bytes")
    fast = None if full_decode else fast_header(head if head is not None else fp.read(_HEAD_BYTES))
    if fast is not None:
        width, height, mode, fmt = fast
        if width * height > max_pixels:
            raise ProbeError(
                IMAGE_TOO_LARGE,
                f"{fmt} image declares {width}x{height} = {width * height:,} pixels, above the cap of "
                f"{max_pixels:,} (decompression bomb guard; raise max_pixels if this is intended)",
            )
        if width > 0 and height > 0 and _trailer_ok(fmt, fp, size):
            return ImageInfo(width, height, mode, fmt, size)
    fp.seek(0)
    try:
        with _PIL_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                mode, fmt = im.mode, (im.format or "unknown")
    except Image.DecompressionBombError as exc:
        raise ProbeError(IMAGE_TOO_LARGE, f"decompression bomb refused by Pillow: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...)
        raise ProbeError(IMAGE_CORRUPT, f"cannot read image header: {type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise ProbeError(IMAGE_CORRUPT, f"image declares a non-positive size {width}x{height}")
    if width * height > max_pixels:
        raise ProbeError(
            IMAGE_TOO_LARGE,
            f"{fmt} image declares {width}x{height} = {width * height:,} pixels, above the cap of "
            f"{max_pixels:,} (decompression bomb guard; raise max_pixels if this is intended)",
        )
    needs_decode = full_decode or fmt not in HEADER_FORMATS
    if not needs_decode and not _trailer_ok(fmt, fp, size):
        needs_decode = True
    if needs_decode:
        try:
            _full_decode(fp, fmt)
        except Exception as exc:  # noqa: BLE001 - any decoder error means unusable pixels
            reason = IMAGE_TRUNCATED if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else IMAGE_CORRUPT
            if reason == IMAGE_CORRUPT and fmt in ("PNG", "JPEG", "MPO") and not _trailer_ok(fmt, fp, size):
                reason = IMAGE_TRUNCATED
            raise ProbeError(reason, f"{fmt} {width}x{height} fails to decode: {type(exc).__name__}: {exc}") from None
    return ImageInfo(width, height, mode, fmt, size)


def _trailer_ok_bytes(fmt: str, data: bytes | memoryview) -> bool:
    if fmt == "PNG":
        return _PNG_IEND in bytes(data[-32:])
    return _JPEG_EOI in bytes(data[-64:]).rstrip(b"\x00\r\n ")[-2:]


def probe_bytes(
    data: bytes | memoryview | None, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False
) -> ImageInfo:
    """Probe encoded image bytes (a parquet ``image`` cell, possibly a zero-copy view); ``None``: missing."""
    if data is None:
        raise ProbeError(IMAGE_MISSING, "image cell is null")
    if not full_decode:  # hot path: plain PNG/JPEG, complete, within the cap -> no stream, no Pillow
        fast = fast_header(data)
        if fast is not None:
            width, height, mode, fmt = fast
            if 0 < width * height <= max_pixels and _trailer_ok_bytes(fmt, data):
                return ImageInfo(width, height, mode, fmt, len(data))
    return probe_stream(io.BytesIO(data), len(data), max_pixels, full_decode, head=data)


def probe_file(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False
) -> ImageInfo:
    """Probe an image file on disk (VLM image folder); reads the header and the last bytes only."""
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            return probe_stream(fp, size, max_pixels, full_decode)
    except FileNotFoundError:
        raise ProbeError(IMAGE_MISSING, f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise ProbeError(IMAGE_MISSING, f"image path {path} is a directory") from None
    except OSError as exc:
        raise ProbeError(IMAGE_CORRUPT, f"image file {path} cannot be read: {exc}") from None
