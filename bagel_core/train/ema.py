"""EMA of the trainable parameters (training.md 6): ema <- d*ema + (1-d)*model, no warm-up, no bias
correction; frozen parameters (sin-cos tables, a frozen ViT) are not updated.

The EMA is a second copy of the model sharded exactly like it, so the update is purely local: each
rank lerps its own shards (fp32 master weights), with no communication.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: Activation checkpointing wraps modules, which adds this to parameter names (state dicts strip it).
_WRAPPED = "_checkpoint_wrapped_module."


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name.replace(_WRAPPED, ""): p for name, p in module.named_parameters()}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Update the EMA copy of every parameter that requires gradients in ``model``."""
    ema_params = _params(ema)
    pairs = [(_local(ema_params[n]), _local(p.detach())) for n, p in _params(model).items() if p.requires_grad]
    if pairs:
        targets, sources = zip(*pairs)
        torch._foreach_lerp_(list(targets), list(sources), 1.0 - decay)
