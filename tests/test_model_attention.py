"""Attention rule and backends: dense mask, sdpa vs flex (forward, no grad), varlen (flash) plan."""

from __future__ import annotations

import pytest
import torch

from bagel_core.model.attention import cached_attention, packed_attention, varlen_plan, varlen_reference
from bagel_core.sequence.layout import PackedLayout, dense_mask

# A multi-sample pack with every mode: VLM-like, edit-like and T2I-like samples.
SAMPLE_LENS = [9, 13, 6]
SPLIT_LENS = [2, 3, 4, 5, 2, 4, 2, 4, 2]
MODES = ["full", "noise", "causal", "full", "causal", "noise", "causal", "causal", "full"]


def _qkv(n: int, nh: int = 4, nkv: int = 2, hd: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, nh, hd, generator=g),
        torch.randn(n, nkv, hd, generator=g),
        torch.randn(n, nkv, hd, generator=g),
    )


def test_mask_matches_documented_example():
    layout = PackedLayout.from_splits([7], [2, 3, 2], ["full", "noise", "causal"])
    want = ["11.....", "11.....", "11111..", "11111..", "11111..", "11...1.", "11...11"]
    got = ["".join("1" if v else "." for v in row) for row in dense_mask(layout).tolist()]
    assert got == want


def test_no_attention_across_samples():
    layout = PackedLayout.from_splits(SAMPLE_LENS, SPLIT_LENS, MODES)
    m = dense_mask(layout)
    assert not m[:9, 9:].any() and not m[9:22, :9].any() and not m[22:, :22].any()


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="add up"):
        PackedLayout.from_splits([5], [2, 2], ["full", "causal"])
    with pytest.raises(ValueError, match="unknown attention modes"):
        PackedLayout.from_splits([2], [2], ["bidirectional"])


def _reference(q, k, v, mask):
    """Plain softmax attention with repeated KV heads and a boolean mask."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_sdpa_matches_masked_softmax_reference():
    layout = PackedLayout.from_splits(SAMPLE_LENS, SPLIT_LENS, MODES)
    q, k, v = _qkv(layout.length)
    torch.testing.assert_close(packed_attention(q, k, v, layout, "sdpa"), _reference(q, k, v, dense_mask(layout)))


def test_sdpa_and_flex_agree_on_packed_multisample_sequence():
    # Long enough for several 128-token flex blocks with documents crossing block borders.
    sample_lens = [150, 90, 60]
    split_lens = [40, 70, 40, 30, 60, 20, 20, 20]
    modes = ["causal", "noise", "causal", "full", "causal", "full", "noise", "causal"]
    layout = PackedLayout.from_splits(sample_lens, split_lens, modes)
    q, k, v = _qkv(layout.length)
    with torch.no_grad():
        a = packed_attention(q, k, v, layout, "sdpa")
        b = packed_attention(q, k, v, layout, "flex")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_plan_for_flash_matches_dense_rule():
    layout = PackedLayout.from_splits(SAMPLE_LENS, SPLIT_LENS, MODES)
    q, k, v = _qkv(layout.length)
    torch.testing.assert_close(varlen_reference(q, k, v, layout), packed_attention(q, k, v, layout, "sdpa"))
    # Multi-turn text after an image: adjacent causal splits merge into one causal segment.
    turns = PackedLayout.from_splits(
        [20, 7], [6, 3, 4, 2, 5, 3, 4], ["full", "causal", "causal", "noise", "causal", "causal", "causal"]
    )
    q, k, v = _qkv(turns.length, seed=1)
    torch.testing.assert_close(varlen_reference(q, k, v, turns), packed_attention(q, k, v, turns, "sdpa"))
    causal_group = next(g for g in varlen_plan(turns) if g.causal)
    assert causal_group.cu_q.tolist() == [0, 7, 12, 19]


def test_flash_without_flash_attn_says_how_to_install():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        layout = PackedLayout.documents([4], "causal")
        q, k, v = _qkv(4)
        with pytest.raises(RuntimeError, match="flash-attn"):
            packed_attention(q, k, v, layout, "flash")


def test_cached_causal_attention_is_bottom_right_aligned():
    q, k, v = _qkv(7)
    # 4 cached keys + 3 new causal tokens == the last 3 rows of a causal pass over 7 tokens.
    out = cached_attention(q[4:], k, v, n_new=3, causal=True)
    full = packed_attention(q, k, v, PackedLayout.documents([7], "causal"), "sdpa")
    torch.testing.assert_close(out, full[4:])
    # A full (image) chunk sees all its own tokens.
    out_full = cached_attention(q[4:], k, v, n_new=3, causal=False)
    torch.testing.assert_close(out_full, _reference(q[4:], k, v, torch.ones(3, 7, dtype=torch.bool)))


def test_tiny_model_forward_sdpa_equals_flex():
    from model_fixtures import MIXED_SAMPLES, make_packed_batch

    from bagel_core.model import build_model, preset

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    batch = make_packed_batch(cfg, MIXED_SAMPLES)
    outs = {}
    for backend in ("sdpa", "flex"):
        model.attn_backend = backend
        with torch.no_grad():
            outs[backend] = model(**batch, noise_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outs["sdpa"].ce, outs["flex"].ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa"].mse, outs["flex"].mse, atol=1e-4, rtol=1e-4)
