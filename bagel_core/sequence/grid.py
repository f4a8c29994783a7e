"""Image grids as token sequences: patchify / unpatchify and the 2-D position ids of a grid.

One rule for the packed dataset (which builds position ids and ViT patches in DataLoader workers)
and the model and inferencer (which place latents), so both agree by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(image: Tensor, patch_size: int) -> Tensor:
    """[C, H, W] -> [(H/p)(W/p), p*p*C]: patches row-major, vector (row, col, channel), channel fastest.

    The one order used for ViT pixels (p=14) and VAE latents (p=2) alike (model.md 12.3-12.4).
    """
    c, h, w = image.shape
    x = image.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def grid_position_ids(rows: int, cols: int, side: int, device: torch.device | str | None = None) -> Tensor:
    """2-D ids row*side + col (extrapolate mode, data-format.md 9.2) for a rows x cols grid."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r * side + c).reshape(-1)


def interpolated_position_ids(rows: int, cols: int, side: int, device: torch.device | str | None = None) -> Tensor:
    """2-D ids for ``interpolate_pos``: buckets of the fractional coordinates among 1/M..(M-1)/M.

    Coordinates and boundaries are fp32 ``arange`` grids (step 1/n and 1/M), as upstream builds
    them; an exact-arithmetic k/n would put some coordinates that land on a boundary (e.g. 15/25
    vs 42/70) in the next bucket.
    """
    bounds = torch.arange(1 / side, 1.0, 1 / side, dtype=torch.float32, device=device)

    def bucket(n: int) -> Tensor:
        coords = torch.arange(0, 1 - 1e-6, 1 / n, dtype=torch.float32, device=device)
        return torch.bucketize(coords, bounds, right=True)

    return (bucket(rows)[:, None] * side + bucket(cols)[None, :]).reshape(-1)


def unpatchify(tokens: Tensor, rows: int, cols: int, patch_size: int, channels: int) -> Tensor:
    """Inverse of ``patchify``: [rows*cols, p*p*C] -> [C, rows*p, cols*p]."""
    p = patch_size
    x = tokens.reshape(rows, cols, p, p, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, rows * p, cols * p)
