"""Packed attention for BAGEL behind one interface: ``sdpa`` (dense mask, CPU), ``flex``, ``flash``.

The pack layout and the attention rule ``visible`` live in ``bagel_core.sequence.layout``; the
dense mask of ``sdpa`` and the block mask of ``flex`` both evaluate it, and the varlen plan of
``flash`` is checked against it in the tests.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bagel_core.sequence.layout import PackedLayout, dense_mask, visible

Backend = Literal["sdpa", "flex", "flash"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "flash")


# ---------------------------------------------------------------- backends


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, backend: str = "sdpa") -> Tensor:
    """Attention over a pack. q [L, nh, hd]; k, v [L, nkv, hd] (GQA); returns [L, nh, hd]."""
    if backend == "sdpa":
        return _sdpa_packed(q, k, v, layout)
    if backend != "sdpa" and layout._cache.get("nested"):
        raise ValueError(f"backend {backend!r} needs split_lens/attn_modes, not nested_attention_masks")
    if backend == "flex":
        return _flex_packed(q, k, v, layout)
    if backend == "flash":
        return _flash_packed(q, k, v, layout)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """SDPA on [n, h, d] tensors with GQA; mask is boolean [nq, nk] (True = visible)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _sdpa_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """One SDPA call per document with its dense mask (no cross-document work)."""
    masks = layout._cache.get("dense")
    if masks is None:
        masks = []
        for (s, e), modes in zip(layout.doc_bounds(), _splits_per_doc(layout)):
            if modes == ["full"]:
                masks.append("full")
            elif all(m == "causal" for m in modes):
                masks.append("causal")
            else:
                masks.append(dense_mask(layout, s, e))
        layout._cache["dense"] = masks
    outs = []
    for (s, e), mask in zip(layout.doc_bounds(), masks):
        if isinstance(mask, str):
            outs.append(_sdpa(q[s:e], k[s:e], v[s:e], causal=mask == "causal"))
        else:
            outs.append(_sdpa(q[s:e], k[s:e], v[s:e], mask=mask))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def _splits_per_doc(layout: PackedLayout) -> list[list[str]]:
    out: list[list[str]] = []
    i = 0
    for n in layout.sample_lens:
        modes, filled = [], 0
        while filled < n:
            modes.append(layout.split_modes[i])
            filled += layout.split_lens[i]
            i += 1
        out.append(modes)
    return out


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_BLOCK_SIZE = 128


@functools.lru_cache(maxsize=1)
def _compiled_block_mask_builder():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def flex_block_mask(layout: PackedLayout):
    """BlockMask of ``visible`` (block 128, as upstream); cached on the layout."""
    bm = layout._cache.get("flex")
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return visible(layout, q_idx, kv_idx)

        n = layout.length
        device = layout.doc_ids.device
        # On GPU the compiled builder avoids materialising the full [L, L] predicate.
        builder = _compiled_block_mask_builder() if device.type == "cuda" else create_block_mask
        bm = builder(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE)
        layout._cache["flex"] = bm
    return bm


def _flex_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """FlexAttention over the whole pack; compiled on GPU, eager (no backward) on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    kwargs = {"block_mask": flex_block_mask(layout), "enable_gqa": q.shape[1] != k.shape[1]}
    if q.is_cuda:
        out = _compiled_flex()(*args, **kwargs)
    else:
        # CPU flex is the unfused reference path (no-grad checks only); its "use torch.compile"
        # warning is expected here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*args, **kwargs)
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------- flash (varlen) plan


@dataclass
class VarlenGroup:
    """Segments that run in one varlen call: queries of some splits and the keys each may see."""

    causal: bool
    q_index: Tensor  # long [sum q]
    k_index: Tensor  # long [sum k]
    cu_q: Tensor  # int32 [n_seg + 1]
    cu_k: Tensor  # int32 [n_seg + 1]
    max_q: int
    max_k: int


def varlen_plan(layout: PackedLayout) -> list[VarlenGroup]:
    """Express ``visible`` as variable-length segments for flash-attn.

    Each split is a query segment (runs of adjacent causal splits merge into one, which is
    equivalent and keeps the key gather small for multi-turn text); its keys are the earlier
    non-noise splits of its document followed by its own tokens. Causal segments then need
    bottom-right causal alignment (flash-attn's convention when q_len < k_len); full/noise
    segments need none. One group (one kernel call) per causality.
    """
    cached = layout._cache.get("varlen")
    if cached is not None:
        return cached
    segments: list[tuple[int, int, str, int]] = []  # (start, length, mode, doc)
    pos, split = 0, 0
    for doc, n_doc in enumerate(layout.sample_lens):
        end = pos + n_doc
        while pos < end:
            n, mode = layout.split_lens[split], layout.split_modes[split]
            prev = segments[-1] if segments else None
            if mode == "causal" and prev is not None and prev[2] == "causal" and prev[3] == doc:
                segments[-1] = (prev[0], prev[1] + n, "causal", doc)
            else:
                segments.append((pos, n, mode, doc))
            pos += n
            split += 1
    groups: dict[bool, dict[str, list]] = {c: {"q": [], "k": [], "lq": [], "lk": []} for c in (True, False)}
    prefix: list[tuple[int, int]] = []  # visible key ranges of the current document
    prefix_len, last_doc = 0, -1
    for start, n, mode, doc in segments:
        if doc != last_doc:
            prefix, prefix_len, last_doc = [], 0, doc
        own = (start, start + n)
        g = groups[mode == "causal"]
        g["q"].append(own)
        g["k"].extend([*prefix, own])
        g["lq"].append(n)
        g["lk"].append(prefix_len + n)
        if mode != "noise":
            prefix.append(own)
            prefix_len += n
    device = layout.doc_ids.device
    plan = []
    for causal, g in groups.items():
        if not g["lq"]:
            continue
        cu_q = torch.tensor([0] + g["lq"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + g["lk"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        plan.append(
            VarlenGroup(
                causal=causal,
                q_index=_ranges_to_index(g["q"], device),
                k_index=_ranges_to_index(g["k"], device),
                cu_q=cu_q.to(device),
                cu_k=cu_k.to(device),
                max_q=max(g["lq"]),
                max_k=max(g["lk"]),
            )
        )
    layout._cache["varlen"] = plan
    return plan


def _ranges_to_index(ranges: list[tuple[int, int]], device: torch.device) -> Tensor:
    return torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in ranges]).to(device)


def bottom_right_causal(n_q: int, n_k: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean [n_q, n_k]: query i sees keys j <= i + (n_k - n_q) (flash-attn's alignment)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """Run ``varlen_plan`` with SDPA per segment: the CPU check of what the flash path computes."""
    out = torch.empty_like(q)
    for g in varlen_plan(layout):
        cq, ck = g.cu_q.tolist(), g.cu_k.tolist()
        for a in range(len(cq) - 1):
            qi = g.q_index[cq[a] : cq[a + 1]]
            ki = g.k_index[ck[a] : ck[a + 1]]
            mask = bottom_right_causal(len(qi), len(ki), q.device) if g.causal else None
            out[qi] = _sdpa(q[qi], k[ki], v[ki], mask=mask)
    return out


def _flash_packed(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """flash-attn varlen kernels (``gpu`` extra), one call per causality group of ``varlen_plan``."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn: pip install 'bagel-pipeline[gpu]' "
            "(CUDA only); use 'flex' or 'sdpa' otherwise"
        ) from exc
    out = torch.empty_like(q)
    for g in varlen_plan(layout):
        res = flash_attn_varlen_func(
            q[g.q_index],
            k[g.k_index],
            v[g.k_index],
            cu_seqlens_q=g.cu_q,
            cu_seqlens_k=g.cu_k,
            max_seqlen_q=g.max_q,
            max_seqlen_k=g.max_k,
            causal=g.causal,
        )
        out[g.q_index] = res
    return out


# ---------------------------------------------------------------- inference with a KV cache


def cached_attention(q: Tensor, k: Tensor, v: Tensor, n_new: int, causal: bool) -> Tensor:
    """New queries [n_new, nh, hd] against cached + new keys [n_kv, nkv, hd] (batch 1).

    Every cached key is visible; among the new tokens attention is causal (bottom-right aligned,
    as flash-attn does upstream) for text and full for image chunks (inference.md 3).
    """
    n_kv = k.shape[0]
    if not causal:
        return _sdpa(q, k, v)
    if n_kv == n_new:
        return _sdpa(q, k, v, causal=True)
    return _sdpa(q, k, v, mask=bottom_right_causal(n_new, n_kv, q.device))
