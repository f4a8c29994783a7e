"""AdamW, the warm-up + constant/cosine LambdaLR schedule and gradient clipping (training.md 5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bagel_core.train.args import TrainingArguments


def build_optimizer(model: nn.Module, t: TrainingArguments) -> torch.optim.AdamW:
    """One parameter group over every trainable parameter: betas (beta1, beta2), eps, no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0)


def lr_lambda(t: TrainingArguments) -> Callable[[int], float]:
    """Multiplier after k scheduler steps: linear warm-up from 0, then constant or cosine to min_lr."""
    warmup, total, floor = t.warmup_steps, t.total_steps, t.min_lr / t.lr

    def fn(k: int) -> float:
        if k < warmup:
            return k / max(1, warmup)
        if t.lr_scheduler == "constant":
            return 1.0
        p = (k - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)) * (1.0 - floor) + floor)

    return fn


def build_scheduler(opt: torch.optim.Optimizer, t: TrainingArguments) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global L2 gradient norm (over all shards: FSDP2 gradients are DTensors, whose norm is
    reduced across the mesh); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
