"""The layout of a packed sequence and its attention rule (data-format.md 9.3).

A pack holds several samples (documents), each a sequence of *splits* with a mode: ``causal``
text, ``full`` images (bidirectional inside, see all earlier context) and ``noise`` images (like
``full``, but hidden from every later token). ``visible`` is the single definition of that rule;
the packed dataset's nested masks, the ``sdpa`` dense mask and the ``flex`` block mask all
evaluate it (``bagel_core.model.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SPLIT_MODES = ("causal", "full", "noise")


@dataclass
class PackedLayout:
    """Per-token description of a pack: which document and split each token is in, and the mode."""

    sample_lens: list[int]
    split_lens: list[int]
    split_modes: list[str]
    doc_ids: Tensor  # int32 [L]
    split_ids: Tensor  # int32 [L], unique over the pack
    full: Tensor  # bool [L]: the token's split is full or noise (bidirectional inside)
    noise: Tensor  # bool [L]: the token's split is noise (invisible to other splits)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return int(self.doc_ids.numel())

    @classmethod
    def from_splits(
        cls,
        sample_lens: list[int],
        split_lens: list[int],
        attn_modes: list[str],
        device: torch.device | str | None = None,
    ) -> PackedLayout:
        """Build from the flex-mode batch fields (data-format.md 11); splits must tile the samples."""
        if len(split_lens) != len(attn_modes):
            raise ValueError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes")
        bad = sorted(set(attn_modes) - set(SPLIT_MODES))
        if bad:
            raise ValueError(f"unknown attention modes {bad}; expected {SPLIT_MODES}")
        doc_of_split: list[int] = []
        doc, filled = 0, 0
        for n in split_lens:
            if doc >= len(sample_lens):
                raise ValueError("split_lens cover more tokens than sample_lens")
            doc_of_split.append(doc)
            filled += n
            if filled > sample_lens[doc]:
                raise ValueError(f"a split crosses the end of sample {doc} (sample_lens={sample_lens})")
            if filled == sample_lens[doc]:
                doc, filled = doc + 1, 0
        if doc != len(sample_lens) or filled:
            raise ValueError("split_lens do not add up to sample_lens")
        lens = torch.tensor(split_lens, dtype=torch.long)
        split_ids = torch.repeat_interleave(torch.arange(len(split_lens), dtype=torch.int32), lens)
        doc_ids = torch.repeat_interleave(torch.tensor(doc_of_split, dtype=torch.int32), lens)
        modes = torch.tensor([SPLIT_MODES.index(m) for m in attn_modes], dtype=torch.long)
        mode_tok = torch.repeat_interleave(modes, lens)
        return cls(
            sample_lens=list(sample_lens),
            split_lens=list(split_lens),
            split_modes=list(attn_modes),
            doc_ids=doc_ids.to(device),
            split_ids=split_ids.to(device),
            full=(mode_tok > 0).to(device),
            noise=(mode_tok == 2).to(device),
        )

    @classmethod
    def documents(cls, lens: list[int], mode: str, device: torch.device | str | None = None) -> PackedLayout:
        """One split per document, all in ``mode`` (e.g. ``full`` per image for the ViT)."""
        return cls.from_splits(list(lens), list(lens), [mode] * len(lens), device)

    @classmethod
    def from_nested_masks(
        cls, sample_lens: list[int], masks: list[Tensor], device: torch.device | str | None = None
    ) -> PackedLayout:
        """Non-flex batches: per-sample float masks (0 visible, -inf hidden); usable by ``sdpa`` only."""
        if len(masks) != len(sample_lens):
            raise ValueError(f"{len(masks)} nested_attention_masks for {len(sample_lens)} samples")
        layout = cls.from_splits(list(sample_lens), list(sample_lens), ["causal"] * len(sample_lens), device)
        layout._cache["dense"] = [(m == 0).to(device) for m in masks]
        layout._cache["nested"] = True
        return layout

    def doc_bounds(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for n in self.sample_lens:
            out.append((start, start + n))
            start += n
        return out


def visible(layout: PackedLayout, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The attention rule (data-format.md 9.3): may the query at ``q_idx`` see the key at ``kv_idx``?

    Same document, and (key not after the query, or both in the same full/noise split), and the
    key is not in a noise split other than the query's. Works elementwise with broadcasting and
    inside a flex ``mask_mod``.
    """
    same_doc = layout.doc_ids[q_idx] == layout.doc_ids[kv_idx]
    same_split = layout.split_ids[q_idx] == layout.split_ids[kv_idx]
    ordered = kv_idx <= q_idx
    bidir = same_split & layout.full[q_idx]
    hidden_noise = layout.noise[kv_idx] & ~same_split
    return same_doc & (ordered | bidir) & ~hidden_noise


def dense_mask(layout: PackedLayout, start: int = 0, end: int | None = None) -> Tensor:
    """Boolean [n, n] mask (True = visible) of the tokens ``start:end`` evaluated with ``visible``."""
    end = layout.length if end is None else end
    idx = torch.arange(start, end, device=layout.doc_ids.device)
    return visible(layout, idx[:, None], idx[None, :])
