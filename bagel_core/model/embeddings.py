"""Adapters and frozen tables around the LLM (model.md section 5).

``PositionEmbedding``: frozen 2-D sin-cos table (a parameter, so it is in every state dict);
``TimestepEmbedder``: 256 cos-first sinusoid features of t in [0, 1] + 2-layer MLP;
``MLPconnector``: ViT width -> LLM width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_2d_table(side: int, dim: int) -> np.ndarray:
    """(side², dim) float64 table; row i*side+j = [sin(jω), cos(jω), sin(iω), cos(iω)], ω_k = 10000^(-k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be divisible by 4")
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
    idx = np.arange(side, dtype=np.float64)
    rows, cols = np.meshgrid(idx, idx, indexing="ij")
    col_f = cols.reshape(-1)[:, None] * omega[None, :]
    row_f = rows.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(col_f), np.cos(col_f), np.sin(row_f), np.cos(row_f)], axis=1)


class PositionEmbedding(nn.Module):
    """Frozen (side², H) sin-cos table indexed by 2-D ids row*side + col."""

    def __init__(self, side: int, hidden: int) -> None:
        super().__init__()
        self.side, self.hidden = side, hidden
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed.device.type == "meta":
            return
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(sincos_2d_table(self.side, self.hidden)).float())

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """t -> [cos(t f_k)] ‖ [sin(t f_k)] (f_k = exp(-ln(1e4) k/128)) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        feats = self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class MLPconnector(nn.Module):
    """fc1 -> gelu-tanh -> fc2 (ViT features to LLM width)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"connector_act {act!r} unsupported (BAGEL uses gelu_pytorch_tanh)")
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
