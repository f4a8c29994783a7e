"""The training loss (training.md 4): token-averaged cross-entropy plus the flow-matching MSE.

Normalisation is by the **global** token counts of the whole optimizer step, all micro-batches of
all ranks together (one all-reduce before the first backward), so:

* the gradient equals that of one process training on the same global batch (FSDP averages
  gradients over ranks, which the factor ``world_size`` cancels, as upstream does);
* ``gradient_accumulation_steps`` G micro-batches give the gradient of one batch holding all of
  them. Upstream divides each micro-batch's own mean by G instead, which weights tokens unequally
  when micro-batches differ in size; we deliberately do not reproduce that.

CE = Σ ce / N_ce (or Σ ce·w / Σ w with ``ce_loss_reweighting``); MSE = Σ_tokens mean₆₄(err²) / N_mse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bagel_core.model.bagel import BagelLossTerms


@dataclass(frozen=True)
class StepTokens:
    """Loss-bearing token counts of one optimizer step over every rank and micro-batch."""

    ce: float  # number of CE tokens, or Σ ce_loss_weights with reweighting
    mse: int  # number of latent tokens with an MSE target


def local_token_counts(batch: dict[str, Any], reweighting: bool) -> tuple[float, int]:
    """(CE count or weight sum, MSE count) of one packed batch, known before the forward."""
    ce_idx = batch.get("ce_loss_indexes")
    if ce_idx is None or ce_idx.numel() == 0:
        ce = 0.0
    elif reweighting:
        ce = float(batch["ce_loss_weights"].double().sum())
    else:
        ce = float(ce_idx.numel())
    mse_idx = batch.get("mse_loss_indexes")
    mse = 0 if mse_idx is None else int(mse_idx.numel())
    return ce, mse


def micro_loss(
    terms: BagelLossTerms,
    batch: dict[str, Any],
    tokens: StepTokens,
    world_size: int,
    ce_weight: float,
    mse_weight: float,
    reweighting: bool,
) -> tuple[torch.Tensor, float, float]:
    """This micro-batch's share of the step loss (backward it as is) and its CE / MSE sums.

    The sums, added over micro-batches and ranks and divided by ``tokens``, are the logged means.
    """
    loss = terms.zero if terms.zero is not None else None
    ce_sum = mse_sum = 0.0
    if terms.ce is not None and terms.ce.numel() and tokens.ce > 0:
        if reweighting:
            ce_total = (terms.ce * batch["ce_loss_weights"].to(terms.ce)).sum()
        else:
            ce_total = terms.ce.sum()
        ce_sum = float(ce_total.detach())
        part = ce_weight * world_size * ce_total / tokens.ce
        loss = part if loss is None else loss + part
    if terms.mse is not None and terms.mse.numel() and tokens.mse > 0:
        mse_total = terms.mse.mean(dim=-1).sum()
        mse_sum = float(mse_total.detach())
        part = mse_weight * world_size * mse_total / tokens.mse
        loss = part if loss is None else loss + part
    if loss is None:
        raise RuntimeError("the batch produced neither CE nor MSE terms (and the model was not asked to touch them)")
    return loss, ce_sum, mse_sum


def pack_samples(batch: dict[str, Any], limit: int = 8) -> str:
    """The samples of a pack, for a message: ``dataset file (row group g, row r)``."""
    entries = batch.get("batch_data_indexes", [])
    names = [
        f"{e.get('dataset')} {e.get('source_file')} (row group {e.get('row_group')}, row {e.get('row_index')})"
        for e in entries[:limit]
    ]
    more = len(entries) - limit
    return "; ".join(names) + (f"; and {more} more" if more > 0 else "")
