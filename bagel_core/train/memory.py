"""Memory plan of a training launch: what every rank holds, from the arguments alone, before anything loads.

Why a plan: BAGEL-7B-MoT has 14.6 B parameters, and full fine-tuning with fp32 master weights, fp32
gradients, AdamW's two fp32 moments and an fp32 EMA needs 20 bytes per parameter (292 GB) before a single
activation; users meet that as an OOM minutes into a launch (training.md 11, #157, #71, #172). The plan
says beforehand, per GPU and per node, what the run needs, whether it fits, and the smallest change that
makes it fit.

What the trainer allocates, and therefore what this module counts (``build.py``, ``optim.py``, ``ema.py``,
``parallelize.py``):

* **Weights.** Built in fp32. Parameters frozen by ``--freeze_llm`` / ``--freeze_vit`` / ``--freeze_und``
  are cast to bf16 (:func:`frozen_reason` is the one rule, used by ``build.freeze`` too); the two sin-cos
  tables are always frozen and stay fp32 (recomputed exactly; their size is small). FSDP2 ``fully_shard``
  gives each rank dim-0 chunks of ``ceil(rows / num_shard)`` rows, **padded** to that size on every rank
  (``_sharded_param_data``), so a rank holds ``ceil(rows / S) * row_numel`` elements per tensor whatever
  its share.
* **Gradients** (trainable parameters only): one fp32 reduce-scatter output per FSDP unit, of the padded
  shard sizes, which the sharded ``.grad`` tensors view. With CPU offload each gradient is copied to the
  host at its *unpadded* shard size.
* **AdamW**: ``exp_avg`` and ``exp_avg_sq`` are ``zeros_like`` of the sharded parameter, i.e. the rank's
  *unpadded* shard in fp32, plus a 4-byte fp32 ``step`` per tensor (on the host). Frozen parameters have no
  state: the optimizer only sees parameters that require gradients.
* **EMA**: a second model sharded like the first (padded), fp32 where trainable, bf16 where frozen.
* **In flight** (the gathered FSDP units): the root unit (embeddings, final norms, ``lm_head``, ``vae2llm``,
  ``llm2vae``) stays gathered from the start of the forward to the end of the backward, as do its
  unsharded gradients once the CE backward has produced them; of the other units, the current and the
  prefetched one are gathered in compute precision, and the current unit's unsharded gradients plus its
  fp32 reduce-scatter input exist during its backward.
* **Activations** of one pack of ``max_num_tokens`` tokens, counted tensor by tensor from the code
  (:func:`activation_bytes`): what autograd saves per decoder layer (the RMSNorm fp32 copies, the q/k norm
  inputs, the q/k/v buffer the attention keeps, the four MLP intermediates, the routing's index copies),
  the ViT and connector, the latent and time embeddings, the logits of the CE tokens (12 bytes x vocabulary
  per CE token at the log-softmax backward: its saved fp32 output, the incoming and the outgoing fp32
  gradient), and one layer's recomputation and backward transients. With activation checkpointing a
  layer keeps only its input. The CPU tests compare this with the peak the CPU allocator reports.
* **VAE**: resident weights (bf16 on GPU) and, in a phase of its own (no grad, before the forward), the
  encode of the pack's images.

Compute precision is bf16 on CUDA (FSDP2 mixed precision, fp32 reduce) and fp32 on CPU. The pack's mix is
unknown before launch, so activations are planned for the worst pack the packer can build: every token a
CE token, or a ViT token, or a VAE latent token (the cost is linear in each count, so one of these corners
is the maximum); ``ce_tokens`` narrows the CE corner when the data bounds it (the Dagster check derives
it from the token statistics).

``lora`` (issue #15 item 2) is an input already: a rank-0 :class:`LoRASpec` adds nothing; when adapters
arrive they add trainable fp32 parameters here and freeze the base weights they wrap.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from bagel_core.config.errors import ConfigError
from bagel_core.model.config import BagelConfig, LLMConfig

GIB = 1 << 30
FP32, BF16 = 4, 2
#: The two 2-D sin-cos tables: parameters without gradients, recomputed in fp32 (model.md 5.1).
TABLES = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")
#: Device memory a CUDA process holds outside tensors: context, NCCL buffers, cuBLAS workspaces.
CUDA_RESERVE = int(2.0 * GIB)
#: Share of the tensor peak lost to the caching allocator's fragmentation.
FRAGMENTATION = 0.05
#: Host memory of one training process outside tensors (interpreter, torch, tokenizer) and of one
#: DataLoader worker (its own interpreter, decoded images, prefetched packs).
PROCESS_ALLOWANCE = int(2.0 * GIB)
WORKER_ALLOWANCE = int(1.0 * GIB)


class MemoryPlanError(ConfigError):
    """The memory plan says the launch will not fit; the message names the numbers and the smallest change."""


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamSpec:
    """One parameter of ``Bagel``: released name, shape, the FSDP unit it is sharded in, its component."""

    name: str
    shape: tuple[int, ...]
    unit: str
    component: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_specs(cfg: BagelConfig) -> list[ParamSpec]:
    """Every parameter of ``Bagel(cfg)`` computed from the configuration alone (model.md 7); the tests check it
    against a model built on ``meta``."""
    llm, out = cfg.llm, []

    def add(name: str, shape: tuple[int, ...], unit: str, component: str) -> None:
        out.append(ParamSpec(name, tuple(int(s) for s in shape), unit, component))

    h, hd, inter = llm.hidden_size, llm.head_dim, llm.intermediate_size
    q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    mot, moe = llm.layer_module == "Qwen2MoTDecoderLayer", llm.layer_module == "Qwen2MoEDecoderLayer"
    for i in range(llm.num_hidden_layers):
        p, unit = f"language_model.model.layers.{i}.", f"layer{i}"
        for sfx in ("", "_moe_gen") if mot else ("",):
            comp = "LLM generation expert" if sfx else "LLM understanding expert"
            a = p + "self_attn."
            add(f"{a}q_proj{sfx}.weight", (q, h), unit, comp)
            add(f"{a}q_proj{sfx}.bias", (q,), unit, comp)
            add(f"{a}k_proj{sfx}.weight", (kv, h), unit, comp)
            add(f"{a}k_proj{sfx}.bias", (kv,), unit, comp)
            add(f"{a}v_proj{sfx}.weight", (kv, h), unit, comp)
            add(f"{a}v_proj{sfx}.bias", (kv,), unit, comp)
            add(f"{a}o_proj{sfx}.weight", (h, q), unit, comp)
            if llm.qk_norm:
                add(f"{a}q_norm{sfx}.weight", (hd,), unit, comp)
                add(f"{a}k_norm{sfx}.weight", (hd,), unit, comp)
            add(f"{p}input_layernorm{sfx}.weight", (h,), unit, comp)
            add(f"{p}post_attention_layernorm{sfx}.weight", (h,), unit, comp)
        for sfx in ("", "_moe_gen") if (mot or moe) else ("",):
            comp = "LLM generation expert" if sfx else "LLM understanding expert"
            add(f"{p}mlp{sfx}.gate_proj.weight", (inter, h), unit, comp)
            add(f"{p}mlp{sfx}.up_proj.weight", (inter, h), unit, comp)
            add(f"{p}mlp{sfx}.down_proj.weight", (h, inter), unit, comp)
    add("language_model.model.embed_tokens.weight", (llm.vocab_size, h), "root", "embed_tokens")
    add("language_model.model.norm.weight", (h,), "root", "LLM understanding expert")
    if llm.use_moe:
        add("language_model.model.norm_moe_gen.weight", (h,), "root", "LLM generation expert")
    add("language_model.lm_head.weight", (llm.vocab_size, h), "root", "lm_head")
    if cfg.visual_und:
        v, vp = cfg.vit, "vit_model.vision_model."
        d = v.hidden_size
        add(f"{vp}embeddings.patch_embedding.weight", (d, v.patch_dim), "vision_model", "ViT")
        add(f"{vp}embeddings.patch_embedding.bias", (d,), "vision_model", "ViT")
        add(f"{vp}embeddings.position_embedding.weight", (v.num_patches_per_side**2, d), "vision_model", "ViT")
        for j in range(v.num_hidden_layers):
            lp, unit = f"{vp}encoder.layers.{j}.", f"vit_layer{j}"
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                add(f"{lp}self_attn.{name}.weight", (d, d), unit, "ViT")
                add(f"{lp}self_attn.{name}.bias", (d,), unit, "ViT")
            for name in ("layer_norm1", "layer_norm2"):
                add(f"{lp}{name}.weight", (d,), unit, "ViT")
                add(f"{lp}{name}.bias", (d,), unit, "ViT")
            add(f"{lp}mlp.fc1.weight", (v.intermediate_size, d), unit, "ViT")
            add(f"{lp}mlp.fc1.bias", (v.intermediate_size,), unit, "ViT")
            add(f"{lp}mlp.fc2.weight", (d, v.intermediate_size), unit, "ViT")
            add(f"{lp}mlp.fc2.bias", (d,), unit, "ViT")
        add(f"{vp}post_layernorm.weight", (d,), "vision_model", "ViT")
        add(f"{vp}post_layernorm.bias", (d,), "vision_model", "ViT")
        add("connector.fc1.weight", (h, d), "connector", "connector")
        add("connector.fc1.bias", (h,), "connector", "connector")
        add("connector.fc2.weight", (h, h), "connector", "connector")
        add("connector.fc2.bias", (h,), "connector", "connector")
        add("vit_pos_embed.pos_embed", (cfg.vit_max_num_patch_per_side**2, h), "vit_pos_embed", "sin-cos tables")
    if cfg.visual_gen:
        add("time_embedder.mlp.0.weight", (h, 256), "time_embedder", "generation adapters")
        add("time_embedder.mlp.0.bias", (h,), "time_embedder", "generation adapters")
        add("time_embedder.mlp.2.weight", (h, h), "time_embedder", "generation adapters")
        add("time_embedder.mlp.2.bias", (h,), "time_embedder", "generation adapters")
        add("vae2llm.weight", (h, cfg.patch_latent_dim), "root", "generation adapters")
        add("vae2llm.bias", (h,), "root", "generation adapters")
        add("llm2vae.weight", (cfg.patch_latent_dim, h), "root", "generation adapters")
        add("llm2vae.bias", (cfg.patch_latent_dim,), "root", "generation adapters")
        add("latent_pos_embed.pos_embed", (cfg.max_latent_size**2, h), "latent_pos_embed", "sin-cos tables")
    return out


def meta_param_shapes(cfg: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the real model built on ``meta`` (nothing allocated, even for 7B)."""
    from bagel_core.model.bagel import build_model

    return {name: tuple(p.shape) for name, p in build_model(cfg, "meta").named_parameters()}


def vae_param_count(cfg: BagelConfig) -> int:
    """Parameters of the FLUX autoencoder of ``cfg`` (built on ``meta``; remembered per VAE configuration)."""
    key = tuple(sorted(dataclasses.asdict(cfg.vae).items()))
    if key not in _VAE_PARAMS:
        import torch

        from bagel_core.model.autoencoder import AutoEncoder

        with torch.device("meta"):
            _VAE_PARAMS[key] = sum(p.numel() for p in AutoEncoder(cfg.vae).parameters())
    return _VAE_PARAMS[key]


_VAE_PARAMS: dict[tuple, int] = {}


# ---------------------------------------------------------------------------------------------- freezing
@dataclass(frozen=True)
class FreezeFlags:
    freeze_llm: bool = False
    freeze_vit: bool = False
    freeze_und: bool = False

    def describe(self) -> str:
        on = [f"--{f.name} True" for f in dataclasses.fields(self) if getattr(self, f.name)]
        return " ".join(on) or "none"


def _und_only(name: str, llm: LLMConfig) -> bool:
    """Whether ``freeze_und``'s detach cuts every gradient path to this LLM parameter: the understanding
    expert's own tensors (those with a ``_moe_gen`` twin), the final understanding norm of MoE/MoT models,
    and ``embed_tokens`` (text embeddings are detached). Shared modules of plain/MoE layers still train
    through the generation rows."""
    if name == "language_model.model.embed_tokens.weight":
        return True
    if name == "language_model.model.norm.weight":
        return llm.use_moe
    if not name.startswith("language_model.model.layers.") or "_moe_gen" in name:
        return False
    if llm.layer_module == "Qwen2MoTDecoderLayer":
        return True
    return llm.layer_module == "Qwen2MoEDecoderLayer" and ".mlp." in name


def frozen_reason(name: str, llm: LLMConfig, flags: FreezeFlags) -> str | None:
    """Why a parameter gets no gradient (None: it trains). The trainer freezes exactly these
    (``build.freeze``) and casts those frozen by a flag to bf16; the tables stay fp32.

    ``freeze_und`` detaches the understanding paths inside the model (model.md 3.4): the understanding
    expert, ``embed_tokens``, the final understanding norm, and the ViT and connector (whose output is
    detached) then never receive a gradient, so they are frozen outright instead of carrying empty
    optimizer slots; ``lm_head`` and the generation branch still train.
    """
    if name in TABLES:
        return "table"
    if flags.freeze_llm and name.startswith("language_model."):
        return "freeze_llm"
    if flags.freeze_vit and name.startswith("vit_model."):
        return "freeze_vit"
    if flags.freeze_und and (_und_only(name, llm) or name.startswith(("vit_model.", "connector."))):
        return "freeze_und"
    return None


@dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters (issue #15 item 2, ``train/lora.py``): ``rank`` 0 adds nothing. Enabled, every base
    parameter is frozen in bf16 (the tables stay fp32), :meth:`adapter_specs` adds the fp32 adapters of the
    linears :meth:`wraps` names (peft's names), and the EMA holds the adapters only; weights, gradients, AdamW,
    EMA and the gathered units sum over that. Not yet counted: the adapters' activations (each adapted linear
    keeps its rank-``r`` intermediate, ``r`` x c bytes per token) and ``--lora_rank`` among the changes tried."""

    rank: int = 0
    targets: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def wraps(self, spec: ParamSpec) -> bool:
        return self.enabled and spec.name.endswith(".weight") and any(t in spec.name for t in self.targets)

    def adapter_specs(self, specs: Iterable[ParamSpec]) -> list[ParamSpec]:
        out = []
        for s in specs:
            if self.wraps(s) and len(s.shape) == 2:
                base = s.name[: -len(".weight")]
                out.append(ParamSpec(f"{base}.lora_A.default.weight", (self.rank, s.shape[1]), s.unit, s.component))
                out.append(ParamSpec(f"{base}.lora_B.default.weight", (s.shape[0], self.rank), s.unit, s.component))
        return out


# ---------------------------------------------------------------------------------------------- sharding
def shard_rows(rows: int, num_shard: int, rank: int) -> tuple[int, int]:
    """(padded, local) dim-0 rows of one rank under FSDP2 (``torch.chunk`` sizes, every rank padded to the
    first chunk's size; a rank past the end holds only padding)."""
    padded = -(-rows // num_shard)
    return padded, max(0, min(padded, rows - rank * padded))


@dataclass(frozen=True)
class TensorPlan:
    """A parameter as the trainer holds it: its spec, storage dtype bytes and whether it trains."""

    spec: ParamSpec
    trainable: bool
    dtype_bytes: int
    frozen_by: str | None

    def padded_numel(self, num_shard: int) -> int:
        rows = self.spec.shape[0]
        return shard_rows(rows, num_shard, 0)[0] * (self.spec.numel // rows)

    def local_numel(self, num_shard: int, rank: int) -> int:
        rows = self.spec.shape[0]
        return shard_rows(rows, num_shard, rank)[1] * (self.spec.numel // rows)


def tensor_plans(cfg: BagelConfig, flags: FreezeFlags, lora: LoRASpec = LoRASpec()) -> list[TensorPlan]:
    specs = param_specs(cfg)
    out = []
    for s in specs:
        reason = frozen_reason(s.name, cfg.llm, flags) or ("lora" if lora.enabled else None)
        trainable = reason is None
        out.append(TensorPlan(s, trainable, FP32 if trainable or reason == "table" else BF16, reason))
    out += [TensorPlan(s, True, FP32, None) for s in lora.adapter_specs(specs)]
    return out


@dataclass
class StateBytes:
    """What one rank holds between steps (bytes), split as the table shows it."""

    weights_trainable: int = 0
    weights_frozen: int = 0
    gradients: int = 0
    optimizer: int = 0  # exp_avg + exp_avg_sq
    optimizer_step: int = 0  # the fp32 ``step`` scalars (host)
    ema: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


def state_bytes(
    plans: list[TensorPlan], num_shard: int, rank: int = 0, cpu_offload: bool = False, ema_frozen: bool = True
) -> StateBytes:
    """Exact bytes of weights, gradients, AdamW state and EMA on ``rank`` (module docstring). Rank 0 always
    holds full chunks, so it is the largest; offloaded gradients are copied at their unpadded size.
    ``ema_frozen`` False: the EMA holds the trainable parameters only (LoRA's adapter EMA)."""
    out = StateBytes()
    for t in plans:
        padded, local = t.padded_numel(num_shard), t.local_numel(num_shard, rank)
        if t.trainable:
            out.weights_trainable += padded * t.dtype_bytes
            out.gradients += (local if cpu_offload else padded) * FP32
            out.optimizer += 2 * local * FP32
            out.optimizer_step += FP32
        else:
            out.weights_frozen += padded * t.dtype_bytes
        if t.trainable or ema_frozen:
            out.ema += padded * t.dtype_bytes
    return out


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class PackShape:
    """The tokens of one pack the activation estimate is for. ``tokens`` is the LLM sequence length (all
    tokens, flex padding included); the others are subsets: CE targets, ViT patches, VAE latent tokens
    (``mse`` of them noised), ``longest_doc`` the longest sample (dense masks / quadratic attention)."""

    tokens: int
    ce: int = 0
    vit: int = 0
    vae: int = 0
    mse: int = 0
    longest_doc: int = 0
    label: str = ""

    @property
    def split(self) -> bool:
        """Both experts have tokens (routing copies rows in and out of each expert)."""
        return 0 < self.vae < self.tokens


@dataclass
class ActivationBytes:
    """Activation memory of one pack on one rank (bytes)."""

    saved: int  # kept for backward at the end of the forward (all layers, ViT, embeddings)
    logits: int  # peak of the CE logits (at the log-softmax backward)
    recompute: int  # one layer's recomputed activations + its backward transients
    masks: int  # dense attention masks (sdpa), cached for the whole step

    @property
    def peak(self) -> int:
        """Saved activations plus the larger of the two transients that never coexist: the logits are freed
        before the first decoder layer's backward starts."""
        return self.saved + self.masks + max(self.logits, self.recompute)


def _llm_layer_bytes(llm: LLMConfig, c: int, split: bool) -> int:
    """Bytes per token autograd saves in one decoder layer's forward (derived from ``qwen2_mot.py``; the CPU
    test checks the total). RMSNorm saves its fp32 input copy and its pre-weight output (4 + c per value) and
    an fp32 rsqrt per row; the q/k/v linears their input; the q/k norms their inputs; the attention q, k, the
    q|k|v buffer (v is a view of it), its output and fp32 log-sum-exp; ``o_proj`` its input; the MLP its input
    and four intermediates (gate, silu, up, product). With both experts present every routed module also
    saves its index-selected input and ``index_copy``'s source."""
    h, i = llm.hidden_size, llm.intermediate_size
    kvd = llm.num_key_value_heads * llm.head_dim
    nh, nkv = llm.num_attention_heads, llm.num_key_value_heads
    small = 8 + 8 * nh + 4 * nkv
    if split:
        return (12 + 14 * c) * h + (4 + 6 * c) * kvd + 4 * c * i + small
    return (12 + 9 * c) * h + (4 + 4 * c) * kvd + 4 * c * i + small


def _llm_backward_transient(llm: LLMConfig, c: int) -> int:
    """Bytes per token alive on top of a layer's saved tensors during its backward: the gradients of the MLP
    product, of silu's output and of up's output (3 x intermediate), and the running gradient of the hidden
    state plus one more hidden-sized gradient."""
    return 3 * c * llm.intermediate_size + 2 * c * llm.hidden_size


def _vit_layer_bytes(cfg: BagelConfig, c: int) -> int:
    """Per ViT token and layer: LayerNorm 1 input and output, q, k, v, the per-image attention outputs and
    their concatenation, LayerNorm 2 input and output (9 hidden-sized), fc1 output and gelu output, the
    LayerNorm statistics and the attention log-sum-exp."""
    v = cfg.vit
    return 9 * c * v.hidden_size + 2 * c * v.intermediate_size + 16 + 4 * v.num_attention_heads


def activation_bytes(
    cfg: BagelConfig,
    shape: PackShape,
    c: int,
    checkpointing: bool,
    attn_backend: str = "sdpa",
    quadratic_attention: bool = False,
) -> ActivationBytes:
    """Activation memory of one pack (module docstring); ``c`` is the compute dtype's bytes (2 bf16 on CUDA,
    4 fp32 on CPU). ``quadratic_attention``: the attention of mixed-mode samples runs SDPA's math kernel
    (CUDA ``sdpa`` with a mask and grouped KV heads), which materialises heads x n² scores."""
    llm, n = cfg.llm, shape.tokens
    h, hd, L = llm.hidden_size, llm.head_dim, llm.num_hidden_layers
    layer = _llm_layer_bytes(llm, c, shape.split)
    # outside the layers: embeddings placed into the sequence (index_copy sources), rope cos/sin (shared by
    # every layer), the routed final norm; token ids and positions
    outside = n * ((4 + 3 * c) * h + 2 * hd * c + 24)
    if shape.vae:
        # patchified latents, noise and x_t (fp32), vae2llm input, time-embedder features and hidden, latent
        # table rows; per noised token the llm2vae input, prediction and fp32 squared error
        outside += shape.vae * (3 * 64 * FP32 + 64 * c + 256 * c + 3 * c * h)
        outside += shape.mse * (c * h + 64 * (c + 2 * FP32))
    vit_saved = vit_recompute = 0
    if shape.vit and cfg.visual_und:
        v = cfg.vit
        per_layer = _vit_layer_bytes(cfg, c)
        # patch vectors and embeddings, post-LN (input, stats, output), connector fc1 output and gelu output,
        # the table rows and the sequence copy
        around = v.patch_dim * c + 4 * c * v.hidden_size + 8 + 4 * c * h
        if checkpointing:
            vit_saved = shape.vit * (v.num_hidden_layers * c * v.hidden_size + around)
            vit_recompute = shape.vit * (per_layer + 2 * c * v.intermediate_size)
        else:
            vit_saved = shape.vit * (v.num_hidden_layers * per_layer + around)
    if checkpointing:
        saved = n * L * c * h + outside + vit_saved
        recompute = n * (layer + _llm_backward_transient(llm, c))
    else:
        saved = n * L * layer + outside + vit_saved
        recompute = n * _llm_backward_transient(llm, c)
    recompute = max(recompute, vit_recompute)
    if attn_backend == "flash":  # q/k/v gathered per segment (keys of earlier splits once more) and the output
        per = n * (2 * c * h + 4 * c * llm.num_key_value_heads * hd)
        saved += per if not checkpointing else 0
        recompute += per if checkpointing else 0
    masks = 0
    if attn_backend == "sdpa" and shape.longest_doc:
        masks = shape.longest_doc * n  # bool [n_d, n_d] per sample, sum(n_d²) <= longest * n
    if quadratic_attention and shape.longest_doc:
        # the math kernel computes the scores in fp32 (it upcasts half inputs); the softmax output is kept
        scores = shape.longest_doc * n * llm.num_attention_heads * FP32
        if checkpointing:
            recompute += 4 * scores  # scores, masked scores, softmax, its gradient: one layer at a time
        else:
            saved += L * scores
            recompute += 3 * scores
    # CE: lm_head input (saved) and the logits' peak: the saved fp32 log-softmax output, the incoming gradient
    # and the outgoing gradient, 12 bytes per vocabulary entry per CE token (fp32 on every device)
    saved += shape.ce * c * h
    logits = shape.ce * 3 * FP32 * llm.vocab_size
    return ActivationBytes(saved=saved, logits=logits, recompute=recompute, masks=masks)


def vae_encode_bytes(cfg: BagelConfig, pixels: int, c: int, quadratic_attention: bool) -> int:
    """Working set of encoding the pack's ``pixels`` pixels with the frozen VAE (no grad, one image at a time):
    the input images, and for the largest image the latent table allows (``max_latent_size`` x 16 px a side)
    about four full-resolution feature maps of the first level alive at once (block input, norm/activation
    output, convolution output, residual sum) and, with SDPA's math kernel, the mid-block attention's
    scores over its latent pixels (16,384 for a 1024² image)."""
    v = cfg.vae
    first = v.ch * v.ch_mult[0]
    image = min(pixels, (cfg.max_latent_size * cfg.latent_downsample) ** 2)
    work = pixels * 3 * (FP32 + c) + 4 * first * image * c
    if quadratic_attention:
        work += 3 * (image // v.downsample**2) ** 2 * FP32
    return work


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryInputs:
    """Everything the plan depends on; :func:`inputs_from_config` builds it from the training arguments."""

    model: BagelConfig
    model_name: str = ""
    nnodes: int = 1
    nproc_per_node: int = 1
    num_shard: int = 1
    num_replicate: int = 1
    sharding_strategy: str = "FULL_SHARD"
    cpu_offload: bool = False
    freeze: FreezeFlags = field(default_factory=FreezeFlags)
    lora: LoRASpec = field(default_factory=LoRASpec)
    activation_checkpointing: bool = True
    device: str = "cuda"  # "cuda" or "cpu"
    attn_backend: str = "sdpa"
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    ce_tokens: int | None = None  # None: every token may be a CE token
    # gradients of later micro-batches accumulate into the sharded buffers in place: no extra state
    gradient_accumulation_steps: int = 1
    num_workers: int = 0
    loads: str = "full"  # "full": rank 0 reads a full state dict; "random": every rank builds one; "dcp": shards
    device_memory: int | None = None  # bytes per GPU; None: unknown (CPU: host RAM decides)
    host_memory: int | None = None  # bytes per node; None: unknown

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def compute_bytes(self) -> int:
        return BF16 if self.device == "cuda" else FP32


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    device: int = 0  # bytes per rank on the device (or in the rank's share of host RAM on CPU)
    host: int = 0  # bytes per node in host RAM


@dataclass(frozen=True)
class Change:
    """A change of arguments that makes the plan fit, with the peak it gives."""

    flags: tuple[str, ...]
    description: str
    device_peak: int
    host_peak: int
    inputs: MemoryInputs | None = None  # the changed inputs (GPUs per node and nodes for --num_shard)


@dataclass
class MemoryPlan:
    inputs: MemoryInputs
    params: dict[str, tuple[int, int]]  # component -> (parameters, trainable)
    rows: list[Row]
    phases: dict[str, int]  # device peak of each phase
    host_peak: int  # per node
    packs: list[PackShape]
    worst_pack: str
    fits: bool
    problems: list[str]
    change: Change | None = None
    alternatives: list[Change] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def device_peak(self) -> int:
        return max(self.phases.values())

    @property
    def verdict(self) -> str:
        if self.fits:
            return "fits"
        if self.change is None:
            return "does not fit (no single or paired change of the usual knobs makes it fit)"
        return f"does not fit; fits only with {' '.join(self.change.flags)}"

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def summary(self) -> str:
        """One paragraph for errors and check metadata: verdict, the numbers, the smallest change."""
        lines = [f"memory plan: {self.verdict}", *self.problems]
        if self.change is not None:
            lines.append(
                f"smallest change: {' '.join(self.change.flags)} ({self.change.description}: "
                f"{_gib(self.change.device_peak)} per {self._unit()}, {_gib(self.change.host_peak)} host RAM per node)"
            )
            for alt in self.alternatives[:4]:
                lines.append(f"  or {' '.join(alt.flags)} ({_gib(alt.device_peak)} per {self._unit()})")
        return "\n".join(lines)

    def _unit(self) -> str:
        return "GPU" if self.inputs.device == "cuda" else "rank"

    def table(self) -> str:
        """The plan as text: header, per-rank rows, host rows, verdict (what ``bagel plan-memory`` prints)."""
        i = self.inputs
        total = sum(n for n, _ in self.params.values())
        trainable = sum(t for _, t in self.params.values())
        unit = self._unit()
        ac = "on" if i.activation_checkpointing else "off"
        dev = f"{i.device} {'bf16 compute, fp32 master' if i.device == 'cuda' else 'fp32'}"
        head = [
            f"memory plan: {i.model_name or 'BAGEL'} ({total / 1e9:.3f} B parameters, {trainable / 1e9:.3f} B "
            f"trainable), {i.nnodes} node(s) x {i.nproc_per_node} {unit}(s), mesh {i.num_replicate} x "
            f"{i.num_shard} ({i.sharding_strategy}), {dev}, activation checkpointing {ac}, attention "
            f"{i.attn_backend}, cpu_offload {i.cpu_offload}, freeze {i.freeze.describe()}"
            + (f", LoRA rank {i.lora.rank}" if i.lora.enabled else ""),
            f"pack: {i.max_num_tokens} tokens; worst case {self.worst_pack}",
        ]
        width = 62
        lines = [*head, f"{'per ' + unit + ' (rank 0)':<{width}} {'GiB':>9}"]
        for r in self.rows:
            if r.device or r.key in ("weights_trainable", "gradients", "optimizer", "ema"):
                lines.append(f"  {r.label:<{width - 2}} {_g(r.device):>9}")
        for phase, value in self.phases.items():
            lines.append(f"  {'= peak, ' + phase:<{width - 2}} {_g(value):>9}")
        budget = i.device_memory
        if i.device == "cuda":
            lines.append(f"  {'device memory':<{width - 2}} {(_g(budget) if budget else 'unknown'):>9}")
        lines.append(f"{'host RAM per node':<{width}} {'GiB':>9}")
        for r in self.rows:
            if r.host:
                lines.append(f"  {r.label:<{width - 2}} {_g(r.host):>9}")
        lines.append(f"  {'= peak':<{width - 2}} {_g(self.host_peak):>9}")
        lines.append(f"  {'host RAM':<{width - 2}} {(_g(i.host_memory) if i.host_memory else 'unknown'):>9}")
        lines.append(f"verdict: {self.verdict}")
        lines += [f"  {p}" for p in self.problems]
        if self.change is not None:
            lines.append(
                f"smallest change: {' '.join(self.change.flags)} -- {self.change.description}: "
                f"{_g(self.change.device_peak)} GiB per {unit}, {_g(self.change.host_peak)} GiB host RAM per node"
            )
            for alt in self.alternatives:
                lines.append(f"  also fits: {' '.join(alt.flags)} ({_g(alt.device_peak)} GiB per {unit})")
        lines += [f"note: {a}" for a in self.assumptions]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "fits": self.fits,
            "device_peak_gib": _r(self.device_peak),
            "host_peak_gib": _r(self.host_peak),
            "phases_gib": {k: _r(v) for k, v in self.phases.items()},
            "rows_gib": {r.key: {"device": _r(r.device), "host": _r(r.host)} for r in self.rows},
            "parameters": {k: {"total": n, "trainable": t} for k, (n, t) in self.params.items()},
            "worst_pack": self.worst_pack,
            "problems": self.problems,
            "change": list(self.change.flags) if self.change else None,
            "alternatives": [list(a.flags) for a in self.alternatives],
            "table": self.table().splitlines(),
        }


def _r(n: int) -> float:
    return round(n / GIB, 3)


def _g(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def worst_packs(i: MemoryInputs) -> list[PackShape]:
    """The corners of the pack mix (module docstring): all CE text, all ViT, all VAE latents."""
    n, cfg = i.max_num_tokens, i.model
    doc = min(i.max_num_tokens_per_sample, n)
    ce = n if i.ce_tokens is None else min(i.ce_tokens, n)
    packs = [PackShape(n, ce=ce, longest_doc=doc, label=f"{ce} CE tokens")]
    if cfg.visual_und:
        packs.append(PackShape(n, ce=0, vit=n, longest_doc=doc, label=f"{n} ViT tokens"))
    if cfg.visual_gen:
        packs.append(PackShape(n, ce=0, vae=n - 2, mse=n - 2, longest_doc=doc, label=f"{n - 2} VAE latent tokens"))
    return packs


def _units(plans: list[TensorPlan]) -> dict[str, list[TensorPlan]]:
    units: dict[str, list[TensorPlan]] = {}
    for t in plans:
        units.setdefault(t.spec.unit, []).append(t)
    return units


def _in_flight(i: MemoryInputs, plans: list[TensorPlan]) -> int:
    """Gathered FSDP units during forward/backward (module docstring): the root's parameters and unsharded
    gradients for the whole step; two other units' parameters (current + prefetched), the current unit's
    unsharded gradients and its fp32 reduce-scatter input (plus the all-reduce buffer of hybrid sharding).
    Without resharding (NO_SHARD) every unit stays gathered."""
    c, s = i.compute_bytes, i.num_shard

    def gathered(ts: list[TensorPlan]) -> int:
        # a one-rank shard in compute precision already *is* the unsharded parameter (no copy)
        return sum(t.spec.numel * c for t in ts if s > 1 or t.dtype_bytes != c or i.cpu_offload)

    def grads(ts: list[TensorPlan]) -> int:
        return sum(t.spec.numel * c for t in ts if t.trainable)

    def reduce_input(ts: list[TensorPlan]) -> int:
        n = sum(t.spec.numel for t in ts if t.trainable)
        return n * FP32 * (1 + (1 if i.num_replicate > 1 else 0) / s)

    units = _units(plans)
    root = units.pop("root", [])
    if i.sharding_strategy == "NO_SHARD":
        everything = [t for ts in units.values() for t in ts] + root
        return gathered(everything) + grads(root) + max([grads(ts) + reduce_input(ts) for ts in units.values()] or [0])
    by_size = sorted(units.values(), key=lambda ts: sum(t.spec.numel for t in ts), reverse=True)
    two = sum(gathered(ts) for ts in by_size[:2])
    biggest = max([grads(ts) + reduce_input(ts) for ts in units.values()] or [0])
    return int(gathered(root) + grads(root) + two + biggest)


def plan_memory(i: MemoryInputs, search: bool = True) -> MemoryPlan:
    """The plan for ``i``; with ``search``, when it does not fit, the smallest change that makes it fit."""
    cfg, c = i.model, i.compute_bytes
    plans = tensor_plans(cfg, i.freeze, i.lora)
    st = state_bytes(plans, i.num_shard, 0, i.cpu_offload, ema_frozen=not i.lora.enabled)
    params: dict[str, tuple[int, int]] = {}
    for t in plans:
        n, tr = params.get(t.spec.component, (0, 0))
        params[t.spec.component] = (n + t.spec.numel, tr + (t.spec.numel if t.trainable else 0))
    on_gpu = i.device == "cuda"
    quadratic = on_gpu and i.attn_backend == "sdpa"
    vae_weights = vae_param_count(cfg) * (BF16 if on_gpu else FP32) if cfg.visual_gen else 0

    def dev(n: int) -> int:
        return 0 if (i.cpu_offload and on_gpu) else n

    packs = worst_packs(i)
    acts = {
        p.label: activation_bytes(
            cfg, p, c, i.activation_checkpointing, i.attn_backend, quadratic and (p.vit > 0 or p.vae > 0)
        )
        for p in packs
    }
    worst = max(packs, key=lambda p: acts[p.label].peak)
    a = acts[worst.label]
    in_flight = _in_flight(i, plans)
    vae_pack = next((p for p in packs if p.vae), None)
    vae_work = (
        vae_encode_bytes(cfg, vae_pack.vae * cfg.latent_downsample**2, BF16 if on_gpu else FP32, quadratic)
        if vae_pack
        else 0
    )
    trainable_local = sum(t.local_numel(i.num_shard, 0) for t in plans if t.trainable)
    largest_local = max([t.local_numel(i.num_shard, 0) for t in plans if t.trainable] or [0])
    foreach = on_gpu and not i.cpu_offload  # AdamW's foreach path: one fp32 temporary per trainable element
    opt_temp = (trainable_local if foreach else largest_local) * FP32
    state_device = dev(st.total - (st.optimizer_step if on_gpu else 0))
    rows = [
        Row("weights_trainable", f"weights, trainable: fp32 master (1/{i.num_shard} shard)", dev(st.weights_trainable)),
        Row("weights_frozen", "weights, frozen: bf16 (tables fp32)", dev(st.weights_frozen)),
        Row("gradients", "gradients, fp32 (sharded)", dev(st.gradients)),
        Row("optimizer", "AdamW exp_avg + exp_avg_sq, fp32", dev(st.optimizer + (0 if on_gpu else st.optimizer_step))),
        Row("ema", "EMA (sharded, dtypes as the weights)", dev(st.ema)),
        Row("vae", f"VAE weights ({'bf16' if on_gpu else 'fp32'}, resident)", vae_weights),
        Row("in_flight", "gathered FSDP units + unsharded gradients in flight", in_flight),
        Row("activations", f"activations saved for backward ({worst.label})", a.saved + a.masks),
        Row("logits", f"CE logits peak ({worst.ce} tokens x 12 B x vocab)", a.logits),
        Row("recompute", "one layer's recomputation + backward transients", a.recompute),
        Row("vae_encode", "VAE encode of the pack's images (own phase)", vae_work),
        Row("optimizer_step", "optimizer step temporaries (own phase)", dev(opt_temp)),
    ]
    fwd = state_device + vae_weights + in_flight + a.peak
    phases = {
        "forward/backward": fwd,
        "VAE encode": state_device + vae_weights + vae_work,
        "optimizer step": state_device + vae_weights + dev(opt_temp),
    }
    if on_gpu:
        tensors = max(phases.values())
        reserve = CUDA_RESERVE + int(FRAGMENTATION * tensors)
        rows.append(Row("reserve", f"CUDA context, NCCL, allocator ({FRAGMENTATION:.0%} of tensors)", reserve))
        phases = {k: v + reserve for k, v in phases.items()}
    # host RAM per node
    per_node = i.nproc_per_node
    host_rows: list[Row] = []
    if on_gpu:
        if i.cpu_offload:
            label = f"offloaded weights, gradients, AdamW, EMA x {per_node} ranks"
            host_rows.append(Row("host_offload", label, host=st.total * per_node))
        else:
            host_rows.append(
                Row("host_steps", f"AdamW step counters x {per_node} ranks", host=st.optimizer_step * per_node)
            )
    else:
        host_rows.append(
            Row("host_ranks", f"{per_node} rank(s) x the per-rank peak above", host=max(phases.values()) * per_node)
        )
    full_fp32 = sum(t.spec.numel for t in plans) * FP32
    largest = max(t.spec.numel for t in plans) * FP32
    if i.loads == "random":
        loading = full_fp32 * 2 * per_node
        load_label = f"start-up: model + EMA built in fp32 before sharding, x {per_node} ranks"
    elif i.loads == "full":
        loading = full_fp32 + largest * per_node
        load_label = "start-up: rank 0 reads the full state dict in fp32"
    else:
        loading = largest * 2 * per_node
        load_label = "start-up: each rank reads its own shards (DCP)"
    host_rows.append(Row("host_loading", load_label, host=loading))
    allowance = per_node * (PROCESS_ALLOWANCE + i.num_workers * WORKER_ALLOWANCE)
    host_rows.append(
        Row(
            "host_processes",
            f"processes: {per_node} x (2 GiB + 1 GiB x {i.num_workers} DataLoader workers)",
            host=allowance,
        )
    )
    rows += host_rows
    steady = sum(r.host for r in host_rows if r.key != "host_loading")
    # the start-up copies are gone before training allocates gradients, AdamW state and activations; offloaded
    # weights and EMA are already allocated (materialised on the host) while rank 0 loads into them
    materialised = (st.weights_trainable + st.weights_frozen + st.ema) * per_node if (on_gpu and i.cpu_offload) else 0
    host_peak = max(steady, loading + allowance + materialised)
    problems: list[str] = []
    fits = True
    unit = "GPU" if on_gpu else "rank"
    if on_gpu and i.device_memory is not None and max(phases.values()) > i.device_memory:
        fits = False
        phase = max(phases, key=phases.get)
        problems.append(
            f"needs {_gib(max(phases.values()))} per {unit} ({phase}) but the device has {_gib(i.device_memory)}"
        )
    if i.host_memory is not None and host_peak > i.host_memory:
        fits = False
        problems.append(f"needs {_gib(host_peak)} of host RAM per node but the node has {_gib(i.host_memory)}")
    assumptions = [
        f"activations are planned for the worst pack of {i.max_num_tokens} tokens: every token a CE token"
        + (f" (bounded to {i.ce_tokens} by --plan_ce_tokens)" if i.ce_tokens is not None else "")
        + ", a ViT token or a VAE latent token; pass --plan_ce_tokens N when the data bounds the CE tokens of a pack",
    ]
    if quadratic:
        assumptions.append(
            "--attn_backend sdpa on CUDA: samples mixing causal text and images need a mask, which with grouped KV "
            "heads runs SDPA's math kernel (heads x n² scores per layer); --use_flex True avoids it"
        )
    plan = MemoryPlan(i, params, rows, phases, host_peak, packs, worst.label, fits, problems, assumptions=assumptions)
    if not fits and search:
        changes = find_changes(i)
        if changes:
            plan.change, plan.alternatives = changes[0], changes[1:]
    return plan


# ---------------------------------------------------------------------------------------------- what fits
def _fits(i: MemoryInputs) -> MemoryPlan | None:
    p = plan_memory(i, search=False)
    return p if p.fits else None


def _largest_tokens(i: MemoryInputs, low: int = 256) -> int | None:
    """The largest ``max_num_tokens`` (a multiple of 256) that fits, if any >= ``low``."""
    lo, hi = low // 256, i.max_num_tokens // 256
    if hi < lo or not _fits(_with_tokens(i, lo * 256)):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(_with_tokens(i, mid * 256)):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def _with_tokens(i: MemoryInputs, n: int) -> MemoryInputs:
    ce = None if i.ce_tokens is None else min(i.ce_tokens, n)
    return replace(i, max_num_tokens=n, max_num_tokens_per_sample=min(i.max_num_tokens_per_sample, n), ce_tokens=ce)


Candidate = tuple[tuple[str, ...], str, "Callable[[MemoryInputs], MemoryInputs] | None"]


def _shard_over(shard: int) -> Callable[[MemoryInputs], MemoryInputs]:
    per = min(8, shard)

    def change(x: MemoryInputs) -> MemoryInputs:
        nodes = -(-shard // per) * x.num_replicate
        return replace(x, num_shard=shard, nproc_per_node=per, nnodes=nodes, sharding_strategy="HYBRID_SHARD")

    return change


def _freeze(**flags: bool) -> Callable[[MemoryInputs], MemoryInputs]:
    return lambda x: replace(x, freeze=replace(x.freeze, **flags))


def _candidates(i: MemoryInputs) -> list[Candidate]:
    """Single changes, smallest first: ones that keep what is trained on the same machines (checkpointing, flex
    attention, a pack at least a quarter of the size, CPU offload), then more GPUs, then training less
    (freezing; LoRA later)."""
    gpu, f = i.device == "cuda", i.freeze
    out: list[Candidate] = []
    if not i.activation_checkpointing:
        ac = ("--activation_checkpointing True",)
        out.append((ac, "recompute layers in backward", lambda x: replace(x, activation_checkpointing=True)))
    if gpu and i.attn_backend == "sdpa":
        out.append((("--use_flex True",), "FlexAttention: no n² scores", lambda x: replace(x, attn_backend="flex")))
    out.append((("--max_num_tokens",), "a smaller pack", None))
    if gpu and not i.cpu_offload:
        offload = ("--cpu_offload True",)
        out.append((offload, "weights, gradients, AdamW and EMA in host RAM", lambda x: replace(x, cpu_offload=True)))
    for shard in (2, 4, 8, 16, 32, 64, 128, 256):
        if gpu and shard > i.num_shard:
            nodes = -(-shard // min(8, shard))
            desc = f"shard over {shard} GPUs ({nodes} node(s) x {min(8, shard)})"
            out.append(((f"--num_shard {shard}",), desc, _shard_over(shard)))
    if not (f.freeze_vit or f.freeze_und or f.freeze_llm) and i.model.visual_und:
        out.append((("--freeze_vit True",), "train without the ViT", _freeze(freeze_vit=True)))
    if not (f.freeze_und or f.freeze_llm):
        desc = "train the generation expert only (understanding expert, ViT frozen)"
        out.append((("--freeze_und True",), desc, _freeze(freeze_und=True)))
    if not f.freeze_llm:
        out.append((("--freeze_llm True",), "train the adapters only (LLM frozen)", _freeze(freeze_llm=True)))
    return out


def find_changes(i: MemoryInputs, limit: int = 6) -> list[Change]:
    """Changes that make ``i`` fit, the smallest first: each single change, then pairs of them (the number of
    GPUs and the pack size are searched for their smallest sufficient change)."""
    singles = _candidates(i)
    found: list[Change] = []
    seen_shards = False

    def attempt(flags: tuple[str, ...], desc: str, x: MemoryInputs | None) -> bool:
        if x is None:
            return False
        p = _fits(x)
        if p is None:
            return False
        found.append(Change(flags, desc, p.device_peak, p.host_peak, x))
        return True

    for flags, desc, fn in singles:
        if flags == ("--max_num_tokens",):
            n = _largest_tokens(i, low=max(256, i.max_num_tokens // 4))
            if n is not None and n < i.max_num_tokens:
                attempt((f"--max_num_tokens {n}",), f"packs of at most {n} tokens", _with_tokens(i, n))
            continue
        if flags[0].startswith("--num_shard"):
            if seen_shards:
                continue
            if attempt(flags, desc, fn(i)):
                seen_shards = True
            continue
        attempt(flags, desc, fn(i))
    if not found:
        for a in range(len(singles)):
            for b in range(a + 1, len(singles)):
                fa, da, ga = singles[a]
                fb, db, gb = singles[b]
                if ga is None or gb is None or (fa[0].startswith("--num_shard") and fb[0].startswith("--num_shard")):
                    continue
                if attempt(fa + fb, f"{da}, and {db}", gb(ga(i))) and len(found) >= limit:
                    return found
    return found[:limit]


# ---------------------------------------------------------------------------------------------- from the data
def ce_tokens_bound(stats_file: str | os.PathLike[str], max_num_tokens: int) -> int | None:
    """The most CE tokens a pack of ``max_num_tokens`` can hold for the data of ``token_stats.parquet``
    (``bagel data stats``), for ``--plan_ce_tokens``. A pack is a union of samples, so its CE share is at most
    the largest share of one sample: its CE tokens over the fewest tokens it can take (its smallest variant,
    less every item CFG dropout can remove). None when the file lacks the columns (an older version)."""
    import polars as pl

    schema = pl.read_parquet_schema(stats_file)
    if not {"ce_tokens", "total_tokens_min"} <= set(schema):
        return None
    droppable = [c for c in ("variant_cfg_text", "variant_cfg_vit", "variant_cfg_vae") if c in schema]
    frame = pl.read_parquet(stats_file, columns=["ce_tokens", "total_tokens_min", *droppable])
    if frame.height == 0:
        return 0
    fewest = pl.col("total_tokens_min")
    for col in droppable:
        dtype = frame.schema[col]
        if isinstance(dtype, pl.List):
            removable = pl.col(col)
            if isinstance(dtype.inner, pl.List):  # per variant, the droppable items' tokens: their sum
                removable = removable.list.eval(pl.element().list.sum())
            fewest = fewest - removable.list.max().fill_null(0)
    ce = pl.col("ce_tokens")
    share = frame.select((ce / pl.max_horizontal(fewest, ce, pl.lit(1))).max()).item()
    return min(max_num_tokens, math.ceil((share or 0.0) * max_num_tokens))


# ---------------------------------------------------------------------------------------------- from arguments
def detect_device_memory(local_rank: int = 0) -> int | None:
    """This machine's GPU memory in bytes (CUDA), else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory)


def detect_host_memory() -> int | None:
    """Physical memory of this machine in bytes (Linux ``MemTotal``), else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def inputs_from_config(
    cfg: Any,
    model: BagelConfig,
    nnodes: int,
    nproc_per_node: int,
    loads: str = "full",
    model_name: str = "",
    lora: LoRASpec | None = None,
) -> MemoryInputs:
    """:class:`MemoryInputs` of a parsed ``TrainConfig`` (world size already checked) for a layout.

    Budgets: ``--device_memory_gb`` plans for GPUs of that size (on any machine) and then leaves host RAM
    unchecked unless ``--host_memory_gb`` is given too; without it the plan is for this machine: its GPU, or
    its CPU with host RAM as the only budget."""
    t, d, m = cfg.training, cfg.data, cfg.model
    device_memory = host_memory = None
    if t.device_memory_gb > 0:
        device, device_memory = "cuda", int(t.device_memory_gb * GIB)
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        device_memory = detect_device_memory(int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda" else None
        host_memory = detect_host_memory()
    if t.host_memory_gb > 0:
        host_memory = int(t.host_memory_gb * GIB)
    ce = t.plan_ce_tokens
    return MemoryInputs(
        model=model,
        model_name=model_name,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        num_shard=t.num_shard,
        num_replicate=t.num_replicate,
        sharding_strategy=t.sharding_strategy,
        cpu_offload=t.cpu_offload,
        freeze=FreezeFlags(t.freeze_llm, t.freeze_vit and model.visual_und, t.freeze_und),
        activation_checkpointing=t.activation_checkpointing,
        device=device,
        attn_backend=m.attn_backend or ("flex" if t.use_flex else "sdpa"),
        max_num_tokens=d.max_num_tokens,
        max_num_tokens_per_sample=d.max_num_tokens_per_sample,
        ce_tokens=None if ce is None or ce < 0 else int(ce),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_workers=d.num_workers,
        loads=loads,
        device_memory=device_memory,
        host_memory=host_memory,
        lora=lora if lora is not None else LoRASpec(),
    )
