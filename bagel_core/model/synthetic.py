"""Synthetic packed batches in the layout of data-format.md sections 9 and 11.

For tests, benchmarks and smoke runs of the model without the data pipeline: item specs per sample
become the model's keyword arguments (markers, RoPE counters, 2-D ids, split modes, CE labels),
with VAE images given directly as random latents (``padded_latent``) and ViT images as random
patches.
"""

from __future__ import annotations

import torch

from bagel_core.model.config import BagelConfig
from bagel_core.sequence.layout import PackedLayout, dense_mask

BOS, EOS, SOI, EOI = 151644, 151645, 151652, 151653


def make_packed_batch(
    cfg: BagelConfig,
    samples: list[list[tuple]],
    seed: int = 0,
    with_nested_masks: bool = False,
) -> dict:
    """Build a packed batch from item specs per sample.

    Items: ("text", n_ids, loss), ("vit", rows, cols), ("vae", rows, cols, noised).
    Returns the model's keyword arguments with ``padded_latent`` already in latent space.
    """
    g = torch.Generator().manual_seed(seed)
    p = cfg.latent_patch_size
    c = cfg.latent_channel
    side_vit = cfg.vit_max_num_patch_per_side
    side_lat = cfg.max_latent_size
    text_ids, text_idx, pos_ids = [], [], []
    split_lens, attn_modes, sample_lens = [], [], []
    vit_tokens, vit_pos, vit_idx, vit_lens = [], [], [], []
    latents, shapes, lat_pos, vae_idx, taus, mse_idx = [], [], [], [], [], []
    labels, ce_idx = [], []
    cur = 0
    for sample in samples:
        start, rope = cur, 0
        for item in sample:
            kind = item[0]
            if kind == "text":
                n, loss = item[1], item[2]
                ids = torch.randint(0, 151643, (n,), generator=g).tolist()
                toks = [BOS, *ids, EOS]
                text_ids += toks
                text_idx += list(range(cur, cur + n + 2))
                pos_ids += list(range(rope, rope + n + 2))
                if loss:
                    ce_idx += list(range(cur, cur + n + 1))
                    labels += [*ids, EOS]
                split_lens.append(n + 2)
                attn_modes.append("causal")
                cur += n + 2
                rope += n + 2
            else:
                rows, cols = item[1], item[2]
                n = rows * cols
                text_ids += [SOI, EOI]
                text_idx += [cur, cur + n + 1]
                pos_ids += [rope] * (n + 2)
                idx = list(range(cur + 1, cur + 1 + n))
                grid = [r * side_vit + q for r in range(rows) for q in range(cols)]
                if kind == "vit":
                    vit_tokens.append(torch.randn(n, cfg.vit.patch_dim, generator=g))
                    vit_pos += grid
                    vit_idx += idx
                    vit_lens.append(n)
                    attn_modes.append("full")
                    rope += 1
                else:
                    noised = item[3]
                    latents.append(torch.randn(c, rows * p, cols * p, generator=g))
                    shapes.append((rows, cols))
                    lat_pos += [r * side_lat + q for r in range(rows) for q in range(cols)]
                    vae_idx += idx
                    tau = torch.randn(1, generator=g).item() if noised else float("-inf")
                    taus += [tau] * n
                    if noised:
                        mse_idx += idx
                        attn_modes.append("noise")
                    else:
                        attn_modes.append("full")
                        rope += 1
                split_lens.append(n + 2)
                cur += n + 2
        sample_lens.append(cur - start)
    batch: dict = {
        "sequence_length": cur,
        "sample_lens": sample_lens,
        "packed_text_ids": torch.tensor(text_ids),
        "packed_text_indexes": torch.tensor(text_idx),
        "packed_position_ids": torch.tensor(pos_ids),
        "split_lens": split_lens,
        "attn_modes": attn_modes,
    }
    if latents:
        hmax = max(t.shape[1] for t in latents)
        wmax = max(t.shape[2] for t in latents)
        padded = torch.zeros(len(latents), c, hmax, wmax)
        for i, t in enumerate(latents):
            padded[i, :, : t.shape[1], : t.shape[2]] = t
        batch.update(
            padded_latent=padded,
            patchified_vae_latent_shapes=shapes,
            packed_latent_position_ids=torch.tensor(lat_pos),
            packed_vae_token_indexes=torch.tensor(vae_idx),
            packed_timesteps=torch.tensor(taus),
            mse_loss_indexes=torch.tensor(mse_idx, dtype=torch.long),
        )
    if vit_tokens:
        batch.update(
            packed_vit_tokens=torch.cat(vit_tokens),
            packed_vit_position_ids=torch.tensor(vit_pos),
            packed_vit_token_indexes=torch.tensor(vit_idx),
            vit_token_seqlens=torch.tensor(vit_lens),
        )
    if ce_idx:
        batch.update(packed_label_ids=torch.tensor(labels), ce_loss_indexes=torch.tensor(ce_idx))
    if with_nested_masks:
        layout = PackedLayout.from_splits(sample_lens, split_lens, attn_modes)
        masks = []
        for s, e in layout.doc_bounds():
            m = torch.zeros(e - s, e - s)
            m.masked_fill_(~dense_mask(layout, s, e), float("-inf"))
            masks.append(m)
        batch["nested_attention_masks"] = masks
        del batch["split_lens"], batch["attn_modes"]
    return batch


#: T2I, VLM and one-step edit samples in one pack (every item kind and mode).
MIXED_SAMPLES = [
    [("text", 5, False), ("vae", 2, 3, True)],
    [("vit", 2, 2), ("text", 4, False), ("text", 6, True)],
    [("vae", 2, 2, False), ("vit", 3, 2), ("text", 3, False), ("vae", 2, 2, True), ("text", 2, True)],
]


def mixed_samples(target_tokens: int, image_side: int = 8, text_len: int = 24) -> list[list[tuple]]:
    """T2I / VLM / edit samples repeated until about ``target_tokens`` (benchmark packs)."""
    s = image_side
    kinds = [
        [("text", text_len, False), ("vae", s, s, True)],
        [("vit", s, s), ("text", text_len // 2, False), ("text", text_len, True)],
        [("vae", s, s, False), ("vit", s, s), ("text", text_len // 3, False), ("vae", s, s, True)],
    ]
    cost = [sum(_item_tokens(it) for it in k) for k in kinds]
    out, total, i = [], 0, 0
    while total + cost[i % 3] <= max(target_tokens, cost[0]):
        out.append(kinds[i % 3])
        total += cost[i % 3]
        i += 1
    return out


def _item_tokens(item: tuple) -> int:
    return item[1] + 2 if item[0] == "text" else item[1] * item[2] + 2
