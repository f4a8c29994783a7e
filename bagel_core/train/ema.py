"""EMA of the trainable parameters (training.md 6): ema <- d*ema + (1-d)*model, no warm-up."""

from __future__ import annotations

import copy

import torch
from torch import nn


def build_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model``."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Update the EMA copy of every parameter that requires gradients in ``model``; frozen ones stay."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[n], p) for n, p in model.named_parameters() if p.requires_grad]
    if not pairs:
        return
    for e, m in pairs:
        e.lerp_(m.detach().to(e.dtype), 1.0 - decay)
