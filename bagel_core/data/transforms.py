"""BAGEL's image transform (upstream ``ImageTransform``), with Pillow + numpy + torch only.

The size arithmetic (``resized_size``) is in ``bagel_core.config.image_args``; this module does the
pixel work with it: RGB conversion, bicubic resize, normalisation.
"""

from __future__ import annotations

import functools

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
        return self.normalise(self.resize(image, img_num))

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)``: what turns this transform's bytes into model inputs (:func:`byte_lut`)."""
        return self.args.image_mean, self.args.image_std

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> contiguous float32 ``[3, H, W]`` holding ``(float32(u8) / 255 - mean) / std`` (each byte
        mapped as :func:`byte_lut` maps it, bit for bit)."""
        pixels = self.bytes_into(image, torch.empty(3, image.height, image.width, dtype=torch.uint8))
        return normalise_bytes(pixels, *self.norm, torch.empty(pixels.shape, dtype=torch.float32), 0)

    def bytes_into(self, image: Image.Image, out: torch.Tensor) -> torch.Tensor:
        """Write the RGB image's bytes into ``out``, a uint8 ``[3, H, W]`` view (any strides), channel planes."""
        rgb, planes = _rgb_array(image), out.numpy()
        for c in range(3):
            np.copyto(planes[c], rgb[:, :, c])
        return out

    def patch_bytes_into(self, image: Image.Image, patch: int, out: torch.Tensor) -> torch.Tensor:
        """Write the image's bytes as patches into ``out``, a contiguous uint8 ``[(H/p)(W/p), p*p*3]`` tensor:
        patches row-major, each vector (row, col, channel), channel fastest (``bagel_core.sequence.grid.patchify``
        order). Moving bytes, not floats, is what makes this cheap."""
        if not out.is_contiguous():
            raise ValueError("patch_bytes_into needs a contiguous output tensor")
        rows, cols = image.height // patch, image.width // patch
        grid = _rgb_array(image).reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4)
        np.copyto(out.numpy().reshape(rows, cols, patch, patch, 3), grid)
        return out


@functools.lru_cache(maxsize=64)
def byte_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 ``[3, 256]``: entry ``[c, b]`` is ``(float32(b) / 255 - mean[c]) / std[c]``, computed with the same
    float32 operations in the same order as the plain formula, so a lookup is bit-identical to it (a test checks
    every byte value). A lookup needs no arithmetic, so it gives the same bits on any device (CUDA divides by a
    scalar through its reciprocal): :func:`normalise_bytes` uses it off the CPU. Callers only read it."""
    table = torch.arange(256, dtype=torch.float32).repeat(3, 1)
    means, stds = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    for c in range(3):
        table[c].div_(255.0).sub_(means[c]).div_(stds[c])
    return table


def normalise_bytes(
    data: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], out: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """``out = (float32(data) / 255 - mean[c]) / std[c]`` for uint8 ``data`` whose channel ``c`` (0-2) runs along
    ``channel_dim``; ``out`` is float32 of the same shape on the same device (any strides). The values are
    :func:`byte_lut`'s, bit for bit: on CPU computed in place with the same float32 operations (the fastest
    there), elsewhere looked up (:func:`gather_bytes`: no division on a device that might round it otherwise)."""
    if data.device.type != "cpu":
        return gather_bytes(data, byte_lut(tuple(mean), tuple(std)), out, channel_dim)
    shape = [1] * data.dim()
    shape[channel_dim] = 3
    means = torch.tensor(mean, dtype=torch.float32).view(shape)
    stds = torch.tensor(std, dtype=torch.float32).view(shape)
    return out.copy_(data).div_(255.0).sub_(means).div_(stds)


def gather_bytes(data: torch.Tensor, lut: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``out[..c..] = lut[c, data[..c..]]`` as one gather on ``data``'s device: each byte plus its channel's offset
    into the flattened ``[3, 256]`` table."""
    shape = [1] * data.dim()
    shape[channel_dim] = 3
    offsets = torch.arange(0, 768, 256, device=data.device).view(shape)
    out.copy_(lut.to(data.device).flatten()[data.long() + offsets])
    return out


def _rgb_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 array of an RGB image's pixels (read-only)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return np.asarray(image)
