"""SigLIP NaViT vision encoder over packed variable-resolution patches (model.md section 4).

Keys live under ``vision_model.`` as in BAGEL's checkpoint. The patch embedding is a Linear over
14x14x3 vectors in (row, column, channel) order, positions come from a learned 70x70 table
indexed by row*70+col, and attention is full within each image and never across images.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bagel_core.model.attention import packed_attention
from bagel_core.model.config import ViTConfig
from bagel_core.sequence.layout import PackedLayout


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=True)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.nh = cfg.num_attention_heads
        self.hd = d // self.nh
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, layout: PackedLayout, backend: str) -> Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.nh, self.hd)
        k = self.k_proj(x).view(n, self.nh, self.hd)
        v = self.v_proj(x).view(n, self.nh, self.hd)
        return self.out_proj(packed_attention(q, k, v, layout, backend).reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: LN1 -> attention -> residual -> LN2 -> MLP -> residual."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor, layout: PackedLayout, backend: str) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), layout, backend)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor, seqlens: list[int], backend: str = "sdpa") -> Tensor:
        layout = PackedLayout.documents(seqlens, "full", device=patches.device)
        x = self.embeddings(patches, position_ids)
        for layer in self.encoder.layers:
            x = layer(x, layout, backend)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """``vit_model``: keeps the ``vision_model.`` level of BAGEL's key names."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: Tensor, position_ids: Tensor, seqlens: list[int], backend: str = "sdpa") -> Tensor:
        """patches [N, 588], ids [N] (row*70+col), seqlens patches per image -> features [N, D]."""
        return self.vision_model(patches, position_ids, seqlens, backend)
