"""Qwen2 decoder with per-token expert routing (plain, MoE and MoT layers; model.md section 3).

Every token is routed to the understanding expert (text, ViT, image markers) or the generation
expert (VAE latents). The MoT layer duplicates norms, q/k/v/o projections, q/k norms and MLP as
``*_moe_gen``; MoE duplicates only the MLP; the plain layer has one expert. Attention is one
softmax over all tokens, provided by the caller (packed training or KV-cached inference).
Module and parameter names match the released state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_core.model.config import LLMConfig

#: attn(layer_idx, q [n, nh, hd], k [n, nkv, hd], v [n, nkv, hd]) -> [n, nh, hd]
AttnFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back, times the weight (model.md 3.2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


@dataclass
class Routing:
    """Token positions per expert; ``None`` means the other expert takes every token."""

    und: Tensor | None
    gen: Tensor | None
    length: int
    detach_und: bool = False
    #: Upstream's inference mode "gen" (inference.md 13): q and k are cast to fp32 before the
    #: per-head q/k RMSNorm, RoPE is applied in fp32, and only then are they cast back to the
    #: hidden dtype (MoT layers only). A no-op for fp32 models; it matters for bf16 weights.
    qk_fp32: bool = False
    #: Training under FSDP: an expert with no tokens in this pack still runs on an empty slice, so
    #: its parameters get (zero) gradients on every rank and the per-unit gradient reduction sees
    #: the same parameters everywhere (a pack without VAE tokens on one rank only would hang it).
    touch_absent: bool = False

    @classmethod
    def all_und(cls, length: int) -> Routing:
        return cls(und=None, gen=None, length=length)

    @classmethod
    def from_gen_indexes(cls, gen: Tensor, length: int, detach_und: bool = False, qk_fp32: bool = False) -> Routing:
        """Understanding expert everywhere except the given (VAE latent) positions."""
        if gen.numel() == 0:
            return cls(None, None, length, detach_und, qk_fp32)
        is_gen = torch.zeros(length, dtype=torch.bool, device=gen.device)
        is_gen[gen] = True
        und = (~is_gen).nonzero().squeeze(1)
        if und.numel() == 0:
            return cls(und=None, gen=gen, length=length, qk_fp32=qk_fp32)
        return cls(und=und, gen=gen, length=length, detach_und=detach_und, qk_fp32=qk_fp32)

    @property
    def only_gen(self) -> bool:
        return self.gen is not None and self.und is None

    def apply(self, x: Tensor, f_und: Callable[[Tensor], Tensor], f_gen: Callable[[Tensor], Tensor] | None) -> Tensor:
        """Run ``f_und`` on understanding rows and ``f_gen`` on generation rows of ``x`` [n, ...]."""
        if f_gen is None or self.gen is None:
            out = f_und(x)
            if self.touch_absent and f_gen is not None:
                out = out + f_gen(x[:0]).sum().to(out.dtype)
            if not self.detach_und:
                return out
            if self.gen is None:
                return out.detach()
            # One shared module: keep gradients only on the generation rows.
            return out.detach().index_copy(0, self.gen, out.index_select(0, self.gen))
        if self.und is None:
            out = f_gen(x)
            return out + f_und(x[:0]).sum().to(out.dtype) if self.touch_absent else out
        out_und = f_und(x.index_select(0, self.und))
        if self.detach_und:
            out_und = out_und.detach()
        out_gen = f_gen(x.index_select(0, self.gen))
        out = out_und.new_zeros((self.length, *out_und.shape[1:]))
        return out.index_copy(0, self.und, out_und).index_copy(0, self.gen, out_gen.to(out_und.dtype))


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [n, hd] in fp32 from packed RoPE ids, cast to ``dtype``; inv_freq recomputed (never stored)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX rotate-half RoPE on x [n, heads, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Attention(nn.Module):
    """Projections (and per-head q/k norms) of one or two experts around a shared attention."""

    def __init__(self, cfg: LLMConfig, layer_idx: int, mot: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.mot = mot
        if mot:
            self.q_proj_moe_gen = nn.Linear(h, self.nh * self.hd, bias=True)
            self.k_proj_moe_gen = nn.Linear(h, self.nkv * self.hd, bias=True)
            self.v_proj_moe_gen = nn.Linear(h, self.nkv * self.hd, bias=True)
            self.o_proj_moe_gen = nn.Linear(self.nh * self.hd, h, bias=False)
            if cfg.qk_norm:
                self.q_norm_moe_gen = RMSNorm(self.hd, cfg.rms_norm_eps)
                self.k_norm_moe_gen = RMSNorm(self.hd, cfg.rms_norm_eps)

    def _qkv(self, x: Tensor, gen: bool, qk_fp32: bool = False) -> Tensor:
        """q, k, v of one expert concatenated on the head axis: [n, nh + 2 nkv, hd].

        The q/k norm runs on the projections *before* RoPE (model.md 3.1). With ``qk_fp32`` the
        norm input is fp32 (so its output is fp32, as upstream's mode "gen"); v is then carried
        in fp32 too for the concatenation, which is lossless.
        """
        sfx = "_moe_gen" if gen else ""
        n = x.shape[0]
        q = getattr(self, "q_proj" + sfx)(x).view(n, self.nh, self.hd)
        k = getattr(self, "k_proj" + sfx)(x).view(n, self.nkv, self.hd)
        v = getattr(self, "v_proj" + sfx)(x).view(n, self.nkv, self.hd)
        if qk_fp32:
            q, k, v = q.float(), k.float(), v.float()
        if self.qk_norm:
            q = getattr(self, "q_norm" + sfx)(q)
            k = getattr(self, "k_norm" + sfx)(k)
        return torch.cat([q, k, v.to(q.dtype)], dim=1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, route: Routing, attn: AttnFn) -> Tensor:
        fp32 = route.qk_fp32 and self.mot  # upstream's plain/MoE attention has no mode "gen"
        qkv = route.apply(
            x,
            lambda t: self._qkv(t, False, fp32),
            (lambda t: self._qkv(t, True, fp32)) if self.mot else None,
        )
        q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=1)
        q = apply_rope(q, cos, sin).to(x.dtype)
        k = apply_rope(k, cos, sin).to(x.dtype)
        v = v.to(x.dtype)
        out = attn(self.layer_idx, q, k, v).reshape(x.shape[0], self.nh * self.hd)
        return route.apply(out, self.o_proj, self.o_proj_moe_gen if self.mot else None)


class _DecoderLayerBase(nn.Module):
    """Pre-norm residual block; which parts exist per expert is set by the subclass."""

    MOT = False
    MOE = False

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Qwen2Attention(cfg, layer_idx, mot=self.MOT)
        self.mlp = Qwen2MLP(h, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if self.MOT or self.MOE:
            self.mlp_moe_gen = Qwen2MLP(h, cfg.intermediate_size)
        if self.MOT:
            self.input_layernorm_moe_gen = RMSNorm(h, eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(h, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, route: Routing, attn: AttnFn) -> Tensor:
        gen_in = self.input_layernorm_moe_gen if self.MOT else None
        gen_post = self.post_attention_layernorm_moe_gen if self.MOT else None
        gen_mlp = self.mlp_moe_gen if (self.MOT or self.MOE) else None
        h = route.apply(x, self.input_layernorm, gen_in)
        x = x + self.self_attn(h, cos, sin, route, attn)
        if gen_mlp is not None and gen_post is None:
            # MoE: shared post-norm, expert-wise MLP.
            h = self.post_attention_layernorm(x)
            return x + route.apply(h, self.mlp, gen_mlp)
        return x + route.apply(
            x,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            (lambda t: gen_mlp(gen_post(t))) if gen_mlp is not None else None,
        )


class Qwen2DecoderLayer(_DecoderLayerBase):
    """Plain Qwen2 layer: one expert for every token."""


class Qwen2MoEDecoderLayer(_DecoderLayerBase):
    """Only the MLP is duplicated for generation tokens."""

    MOE = True


class Qwen2MoTDecoderLayer(_DecoderLayerBase):
    """Everything but the attention softmax is duplicated for generation tokens (BAGEL-7B-MoT)."""

    MOT = True


LAYER_CLASSES: dict[str, type[_DecoderLayerBase]] = {
    "Qwen2DecoderLayer": Qwen2DecoderLayer,
    "Qwen2MoEDecoderLayer": Qwen2MoEDecoderLayer,
    "Qwen2MoTDecoderLayer": Qwen2MoTDecoderLayer,
}


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and the expert-wise final norm."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer_cls = LAYER_CLASSES[cfg.layer_module]
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_moe:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, position_ids: Tensor, route: Routing, attn: AttnFn) -> Tensor:
        """x [n, H] input embeddings -> final hidden states [n, H] (after the final norm)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, route, attn)
        return route.apply(x, self.norm, self.norm_moe_gen if self.cfg.use_moe else None)


class Qwen2ForCausalLM(nn.Module):
    """``language_model``: the decoder plus an untied ``lm_head``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        if cfg.tie_word_embeddings:
            raise ValueError("BAGEL keeps embed_tokens and lm_head separate (tie_word_embeddings=False)")
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def copy_init_moe(self) -> None:
        """Start both experts identical: every ``*_moe_gen*`` tensor copies its un-suffixed twin."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if "_moe_gen" in name:
                    p.copy_(params[name.replace("_moe_gen", "")])


class KVCache:
    """Per-layer keys (after q/k norm and RoPE) and values of a context (inference.md 3)."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.length = 0

    def get(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        return self.keys[layer], self.values[layer]

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        pk, pv = self.keys[layer], self.values[layer]
        self.keys[layer] = k if pk is None else torch.cat([pk, k], 0)
        self.values[layer] = v if pv is None else torch.cat([pv, v], 0)

    def copy(self) -> KVCache:
        """Shallow copy: tensors are never modified in place, so sharing them is safe."""
        new = KVCache(len(self.keys))
        new.keys, new.values, new.length = list(self.keys), list(self.values), self.length
        return new
