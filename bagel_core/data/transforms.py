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
        self._per_patch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> contiguous float32 ``[3, H, W]`` holding ``(float32(u8) / 255 - mean) / std``."""
        return self.normalise_into(image, torch.empty(3, image.height, image.width, dtype=torch.float32))

    def normalise_into(self, image: Image.Image, out: torch.Tensor) -> torch.Tensor:
        """Write :meth:`normalise` of ``image`` into ``out`` (a float32 ``[3, H, W]`` view, any strides).

        The same IEEE float32 operations in the same order as the plain version (``np.asarray(image,
        float32) / 255``, then ``- mean``, then ``/ std``), so every value is bit-identical (a test checks all
        256 byte values); but the bytes become floats once, straight in the destination (the packed
        dataset's ``padded_images``), and the three steps run in place there: no float HWC array, copy or
        intermediate tensors, which made this the loader's costliest step after the resize.
        """
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        rgb, planes = np.asarray(image), out.numpy()  # HWC bytes; out's memory (CHW) as numpy
        mean, std = self._mean.view(3), self._std.view(3)
        for c in range(3):  # one channel plane at a time: converted by numpy (faster than torch's permuted
            np.copyto(planes[c], rgb[:, :, c], casting="unsafe")  # copy), then scaled while still in cache
            out[c].div_(255.0).sub_(mean[c]).div_(std[c])
        return out

    def patches_into(self, image: Image.Image, patch: int, out: torch.Tensor) -> torch.Tensor:
        """Write ``patchify(normalise(image), patch)`` (``bagel_core.sequence.grid``) into ``out``, a contiguous
        float32 ``[(H/p)(W/p), p*p*3]`` tensor: patches row-major, each vector (row, col, channel), channel
        fastest. The bytes are put in patch order first (one byte each, cheaper than moving floats), then
        normalised in place with per-channel mean/std repeated along the vector: the same operation on
        every value as :meth:`normalise`, so the patches are bit-identical to patchifying its result."""
        rows, cols = image.height // patch, image.width // patch
        grid = _rgb_bytes(image).view(rows, patch, cols, patch, 3).permute(0, 2, 1, 3, 4)
        out.view(rows, cols, patch, patch, 3).copy_(grid)
        mean, std = self._patch_moments(patch)
        return out.div_(255.0).sub_(mean).div_(std)

    def _patch_moments(self, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std laid out like one patch vector (channel fastest), made once per patch size."""
        cached = self._per_patch.get(patch)
        if cached is None:
            cached = (self._mean.view(3).repeat(patch * patch), self._std.view(3).repeat(patch * patch))
            self._per_patch[patch] = cached
        return cached


def _rgb_bytes(image: Image.Image) -> torch.Tensor:
    """``[H, W, 3]`` uint8 tensor of an RGB image's pixels (one copy of its bytes)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    # a bytearray, not the bytes object: torch wants a writable buffer (it is only read)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
