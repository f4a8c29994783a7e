"""Stand-ins for the third-party modules upstream's ``data/`` package imports but that cannot be installed here.

``bench/loader.py`` runs upstream's own ``data/dataset_base.py`` ``PackedDataset`` unchanged (loaded from a
folder the user gives, never copied into this repository) as the speed baseline. Upstream imports:

* ``torchvision`` (``data/transforms.py``): the torchvision wheel does not import beside this project's
  torch build, so :func:`install` registers a module that provides exactly the calls upstream's
  ``ImageTransform`` makes, with torchvision's semantics for PIL input:

  - ``functional.resize(img, [h, w], interpolation, antialias=True)``: torchvision returns the image
    itself when it already has that size, else calls ``PIL.Image.resize((w, h), resample)`` with the
    Pillow filter of the interpolation mode (Pillow always antialiases, which is what ``antialias=True``
    asks for on PIL images);
  - ``ToTensor``: ``np.array(pic, uint8, copy=True)`` -> HWC -> CHW contiguous -> ``float32 / 255``;
  - ``Normalize(mean, std, inplace)``: ``tensor.sub_(mean).div_(std)`` with ``[C, 1, 1]`` tensors;
  - ``InterpolationMode``: the enum, mapped to Pillow filters.

* ``cv2`` (``data/transforms.py``, only inside ``motion_blur_opencv``, which the packer never calls) and
  ``decord`` (``data/video_utils.py``, only for video samples, which the example data has none of): empty
  modules, so the module-level imports succeed; any attribute use raises.

Nothing here is used by ``bagel_core``; it exists for the benchmark only.
"""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    """torchvision's enum (values as torchvision's)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_FILTER = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def resize(
    img: Image.Image, size: Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR, **_: object
) -> Image.Image:
    """``torchvision.transforms.functional.resize`` for a PIL image and an explicit ``[h, w]``."""
    if not isinstance(img, Image.Image):
        raise TypeError("the stand-in resize handles PIL images only (upstream's ImageTransform passes PIL)")
    height, width = int(size[0]), int(size[1])
    if (img.height, img.width) == (height, width):
        return img
    return img.resize((width, height), _PIL_FILTER[interpolation])


def to_tensor(pic: Image.Image) -> torch.Tensor:
    """``torchvision.transforms.functional.to_tensor`` for 8-bit PIL modes."""
    if pic.mode not in ("RGB", "L", "RGBA", "P", "CMYK", "LA"):
        raise TypeError(f"the stand-in to_tensor does not handle mode {pic.mode}")
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """``torchvision.transforms.functional.normalize`` for a float ``[C, H, W]`` tensor."""
    if not inplace:
        tensor = tensor.clone()
    m = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(m).div_(s)


class ToTensor:
    def __call__(self, pic: Image.Image) -> torch.Tensor:
        return to_tensor(pic)


class Normalize(torch.nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        super().__init__()
        self.mean, self.std, self.inplace = list(mean), list(std), inplace

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return normalize(tensor, self.mean, self.std, self.inplace)


class _Absent(types.ModuleType):
    """A module whose every attribute use fails: it only satisfies a module-level ``import``."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name} is not available (benchmark stand-in module)")


def install() -> None:
    """Register ``torchvision`` (the pieces above), ``cv2`` and ``decord`` in ``sys.modules``."""
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = resize  # type: ignore[attr-defined]
    functional.to_tensor = to_tensor  # type: ignore[attr-defined]
    functional.normalize = normalize  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    transforms.ToTensor = ToTensor  # type: ignore[attr-defined]
    transforms.Normalize = Normalize  # type: ignore[attr-defined]
    transforms.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "torchvision": torchvision,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )
    for name in ("cv2", "decord"):
        sys.modules.setdefault(name, _Absent(name))
