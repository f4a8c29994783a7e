"""BAGEL's image transform (upstream ``ImageTransform``), with Pillow + numpy + torch only.

The size arithmetic (``resized_size``) is in ``bagel_core.config.image_args``; this module does the
pixel work with it: RGB conversion, bicubic resize, normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bagel_core.config.image_args import DEFAULT_MAX_PIXELS, ImageTransformArgs


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
            args.max_image_size,
            args.min_image_size,
            args.image_stride,
            args.max_pixels,
            args.image_mean,
            args.image_std,
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
