"""What a training process really allocates, for the memory plan tests.

* :func:`held_bytes`: the model, EMA and AdamW built by the trainer's own functions, one optimizer step the
  way ``Trainer.train_step`` takes it, then the bytes of the distinct storages behind the model's sharded
  parameters (trainable / frozen), their sharded gradients (read before ``zero_grad``), AdamW's state and the
  EMA's parameters, plus which parameters require gradients and their dtypes. Distinct storages, so views (a
  DTensor's local shard is a view of its padded storage; the gradients of one FSDP unit are views of one
  reduce-scatter buffer) are counted once, at their real size.
* :func:`peak_allocated`: the highest total of live bytes the CPU allocator reports between the start and
  the end of a function (the profiler's allocation and free events, in time order): the CPU counterpart of
  ``torch.cuda.max_memory_allocated`` over exactly that region, everything torch allocates included.

Under torchrun, ``python -m memory_probe`` does that for each argument list of ``MEM_PROBE_ARGS`` (JSON) in one
process group and writes ``MEM_PROBE_OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from bagel_core.model.synthetic import make_packed_batch
from bagel_core.train.args import parse_args
from bagel_core.train.build import build_models, model_config, plan_weights
from bagel_core.train.distributed import Distributed, all_reduce_sum, init_distributed, shutdown
from bagel_core.train.ema import update_ema
from bagel_core.train.loss import StepTokens, local_token_counts, micro_loss
from bagel_core.train.optim import build_optimizer, clip_grad_norm

WRAPPED = "_checkpoint_wrapped_module."


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once, whole storages counted)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def training_parts(argv: list[str], dist_info: Distributed) -> tuple[Any, Any, Any, torch.optim.Optimizer]:
    """(model config, model, EMA, AdamW) exactly as the trainer builds them (``build_models``,
    ``build_optimizer``) for ``argv``; no data is read."""
    cfg = parse_args(argv, world_size=dist_info.world_size)
    weights = plan_weights(cfg)
    bcfg = model_config(cfg, weights)
    torch.manual_seed(cfg.training.global_seed)
    model, ema, _ = build_models(cfg, weights, bcfg, dist_info)
    return bcfg, model, ema, build_optimizer(model, cfg.training)


#: A pack with every branch: T2I (noised latents), VLM (ViT + CE text), editing (clean + noised latents).
PROBE_SAMPLES = [
    [("text", 6, False), ("vae", 3, 4, True)],
    [("vit", 4, 3), ("text", 5, False), ("text", 9, True)],
    [("vae", 2, 3, False), ("vit", 2, 2), ("text", 4, False), ("vae", 3, 3, True), ("text", 3, True)],
]


def held_bytes(bcfg: Any, model: Any, ema: Any, optimizer: torch.optim.Optimizer, dist_info: Distributed) -> dict:
    """One optimizer step as ``Trainer.train_step`` takes it (forward with ``touch_unused``, the step's token-
    normalised loss, backward, clipping, AdamW, EMA), on a synthetic pack with every branch (a different one on
    each rank), then what the process holds (module docstring)."""
    batch = make_packed_batch(bcfg, PROBE_SAMPLES, seed=dist_info.rank)
    ce, mse = local_token_counts(batch, False)
    ce_n, mse_n = all_reduce_sum([ce, mse], dist_info)
    gen = torch.Generator().manual_seed(dist_info.rank)
    terms = model(**batch, noise_generator=gen, touch_unused=True)
    loss, _, _ = micro_loss(terms, batch, StepTokens(ce=ce_n, mse=int(mse_n)), dist_info.world_size, 1.0, 1.0, False)
    loss.backward()
    clip_grad_norm(model, 1.0)
    named = [(n.replace(WRAPPED, ""), p) for n, p in model.named_parameters()]
    gradients = unique_bytes(p.grad for _, p in named if p.grad is not None)
    with_grad = sorted(n for n, p in named if p.grad is not None)
    optimizer.step()
    update_ema(ema, model, 0.9)
    optimizer.zero_grad(set_to_none=True)
    moments, steps = [], []
    for state in optimizer.state.values():
        moments += [state["exp_avg"], state["exp_avg_sq"]]
        steps.append(state["step"])
    return {
        "weights_trainable": unique_bytes(p for _, p in named if p.requires_grad),
        "weights_frozen": unique_bytes(p for _, p in named if not p.requires_grad),
        "gradients": gradients,
        "optimizer": unique_bytes(moments),
        "optimizer_step": unique_bytes(steps),
        "ema": unique_bytes(ema.parameters()),
        "trainable": sorted(n for n, p in named if p.requires_grad),
        "with_grad": with_grad,
        "optimizer_params": len(optimizer.state),
        "dtypes": {n: str(p.dtype) for n, p in named},
        "ema_dtypes": {n.replace(WRAPPED, ""): str(p.dtype) for n, p in ema.named_parameters()},
        "loss": loss.item(),
    }


def peak_allocated(fn: Callable[[], Any]) -> int:
    """Peak of live bytes allocated on the CPU while ``fn`` runs, above what was live when it started."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    argvs = json.loads(os.environ["MEM_PROBE_ARGS"])
    out = Path(os.environ["MEM_PROBE_OUT"])
    dist_info = init_distributed("FULL_SHARD")
    try:
        results = [held_bytes(*training_parts(argv, dist_info), dist_info) for argv in argvs]
    finally:
        shutdown(dist_info)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist_info.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
