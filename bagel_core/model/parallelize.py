"""Parallelism applied to a built BAGEL from outside (torchtitan's rule): activation checkpointing
and FSDP2 ``fully_shard`` over ``Bagel.shard_units()`` and the root.

The model code knows nothing of either: checkpointing wraps modules with PyTorch's non-reentrant
``checkpoint_wrapper`` (state-dict keys are unchanged: the wrapper strips its prefix), and
``fully_shard`` turns parameters into DTensors sharded over the mesh's ``shard`` dimension
(replicated over ``replicate`` for hybrid sharding).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from bagel_core.model.bagel import Bagel


def apply_activation_checkpointing(model: Bagel, preserve_rng_state: bool = False) -> Bagel:
    """Recompute each decoder layer, each SigLIP encoder layer and the connector in backward
    (upstream's choice, training.md 7). Call before :func:`apply_fsdp`. ``preserve_rng_state``: replay the
    forward's RNG in the recomputation (needed when the layers draw random numbers, e.g. LoRA dropout)."""
    wrap = _wrapper(preserve_rng_state)
    layers = model.language_model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = wrap(layer)
    if model.cfg.visual_und:
        vit_layers = model.vit_model.vision_model.encoder.layers
        for i, layer in enumerate(vit_layers):
            vit_layers[i] = wrap(layer)
        model.connector = wrap(model.connector)
    return model


def _wrapper(preserve_rng_state: bool = False):
    def wrap(module: nn.Module) -> nn.Module:
        return checkpoint_wrapper(
            module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=preserve_rng_state
        )

    return wrap


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters and compute with fp32 gradient reduction on GPU (fp32 master weights stay in the
    sharded parameters); fp32 compute on CPU, where bf16 matmuls are slow and not what we test.

    The compute dtype is always set, so frozen parameters stored in bf16 (``--freeze_*``) are gathered in it
    like every other parameter: on CPU they compute in fp32 next to the fp32 trainable ones."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32)


def apply_fsdp(
    model: Bagel,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> Bagel:
    """``fully_shard`` every shard unit, innermost first, then the root (which keeps the embeddings,
    final norms, ``lm_head``, ``vae2llm`` and ``llm2vae``)."""
    # pinned host memory speeds up the copies to and from a GPU and needs one to exist
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "offload_policy": offload}
    for unit in model.shard_units():
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    return model
