"""BAGEL's image resize rules (upstream ``ImageTransform``), with Pillow + numpy + torch only.

The size arithmetic is separate from pixel work so token accounting can compute exact token counts
from image headers without decoding anything (``resized_size``), while training and inference use
the same function to actually resize (``ImageTransform``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as upstream does it: transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """Resize (bicubic, antialiased) to BAGEL's size, then scale to [-1, 1] as a float CHW tensor."""

    def __init__(
        self,
        max_image_size: int,
        min_image_size: int,
        image_stride: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.args = ImageTransformArgs(
            max_image_size, min_image_size, image_stride, max_pixels, tuple(image_mean), tuple(image_std)
        )
        self.stride = image_stride
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_args(cls, args: ImageTransformArgs) -> ImageTransform:
        return cls(
            args.max_image_size, args.min_image_size, args.image_stride, args.max_pixels,
            args.image_mean, args.image_std,
        )

    def resize(self, image: Image.Image, img_num: int = 1) -> Image.Image:
        image = to_rgb(image)
        size = self.args.resized_size(image.width, image.height, img_num)
        if size == image.size:
            return image
        return image.resize(size, resample=Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image, img_num: int = 1) -> torch.Tensor:
        resized = self.resize(image, img_num)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self._mean) / self._std
