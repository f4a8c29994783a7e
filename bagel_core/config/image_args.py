"""``image_transform_args`` of the dataset YAML and the resize arithmetic they define.

The size arithmetic is separate from pixel work so token accounting can compute exact token counts
from image headers without decoding anything (``resized_size``), while training and inference use
the same function to actually resize (``bagel_core.data.transforms.ImageTransform``). It lives in
the config layer because the dataset YAML parser builds these arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Upstream default pixel budget: 14 * 14 * 9 * 1024.
DEFAULT_MAX_PIXELS = 1_806_336


def _snap(value: float, stride: int) -> int:
    """Nearest multiple of ``stride`` (half-to-even, like Python's ``round``), never below one stride."""
    return max(stride, round(value / stride) * stride)


def _fit(width: float, height: float, scale: float, stride: int) -> tuple[int, int]:
    return _snap(round(width * scale), stride), _snap(round(height * scale), stride)


def resized_size(
    width: int,
    height: int,
    max_image_size: int,
    min_image_size: int,
    image_stride: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    img_num: int = 1,
) -> tuple[int, int]:
    """Output (width, height) of BAGEL's resize for an input of ``width`` x ``height``.

    Follows data-format.md 7.2 exactly, including its quirks: the short-edge floor wins over the
    long-edge cap, and the pixel-budget step applies an *area* ratio linearly to each side.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(max_image_size / max(width, height), 1.0)
    scale = max(scale, min_image_size / min(width, height))
    out_w, out_h = _fit(width, height, scale, image_stride)
    budget = max_pixels / img_num
    if out_w * out_h > budget:
        out_w, out_h = _fit(out_w, out_h, budget / (out_w * out_h), image_stride)
    if max(out_w, out_h) > max_image_size:
        out_w, out_h = _fit(out_w, out_h, max_image_size / max(out_w, out_h), image_stride)
    return out_w, out_h


@dataclass(frozen=True)
class ImageTransformArgs:
    """``image_transform_args`` / ``vit_image_transform_args`` of the dataset YAML."""

    max_image_size: int
    min_image_size: int
    image_stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def resized_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        return resized_size(
            width, height, self.max_image_size, self.min_image_size, self.image_stride, self.max_pixels, img_num
        )
