"""The BAGEL top model: LLM + ViT + connector + generation adapters (model.md sections 1, 5, 6).

``forward`` is the training forward over one packed batch (data-format.md 11, with
``padded_images`` already VAE-encoded into ``padded_latent``) and returns the per-token CE and
per-element MSE terms of training.md 4.1; the reduction over ranks is the training loop's job.
The ``embed_*`` / ``forward_cached`` methods are the pieces the KV-cached inferencer uses.
Every decoder layer, ViT encoder layer, the connector, time embedder and tables are separate
modules, so FSDP can shard them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_core.model.attention import BACKENDS, cached_attention, packed_attention
from bagel_core.model.config import BagelConfig
from bagel_core.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from bagel_core.model.qwen2_mot import KVCache, Qwen2ForCausalLM, Routing
from bagel_core.model.siglip_navit import SiglipVisionModel
from bagel_core.sequence.grid import patchify
from bagel_core.sequence.layout import PackedLayout


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """shift_s(t) = s t / (1 + (s - 1) t): identity at s = 1, pushes t towards noise for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class BagelLossTerms:
    """Unreduced loss terms of one packed batch."""

    ce: Tensor | None  # [N_ce] per-token cross-entropy
    mse: Tensor | None  # [N_mse, 64] per-element squared error
    #: 0 * (outputs of the branches this pack did not use), when ``touch_unused``: add it to the loss
    #: so every trainable parameter gets a gradient (zero for those branches) on every rank.
    zero: Tensor | None = None


class Bagel(nn.Module):
    """BAGEL: ``language_model``, ``vit_model``, ``connector``, ``vit_pos_embed``, ``time_embedder``,
    ``vae2llm``, ``llm2vae``, ``latent_pos_embed`` (the VAE is separate)."""

    def __init__(self, cfg: BagelConfig, attn_backend: str = "sdpa") -> None:
        super().__init__()
        cfg.validate()
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {BACKENDS}")
        self.cfg = cfg
        self.attn_backend = attn_backend
        h = cfg.llm.hidden_size
        self.language_model = Qwen2ForCausalLM(cfg.llm)
        if cfg.visual_und:
            self.vit_model = SiglipVisionModel(cfg.vit)
            self.connector = MLPconnector(cfg.vit.hidden_size, h, cfg.connector_act)
            self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, h)
        if cfg.visual_gen:
            self.time_embedder = TimestepEmbedder(h)
            self.vae2llm = nn.Linear(cfg.patch_latent_dim, h)
            self.llm2vae = nn.Linear(h, cfg.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, h)
            if self.llm2vae.weight.device.type != "meta":
                nn.init.zeros_(self.llm2vae.weight)
                nn.init.zeros_(self.llm2vae.bias)

    # ------------------------------------------------------------ construction helpers

    def init_fresh(self) -> Bagel:
        """Finish a freshly built (non-loaded) model: identical experts (copy_init_moe)."""
        self.language_model.copy_init_moe()
        return self

    def init_weights(self) -> Bagel:
        """Initialise every tensor, e.g. after ``to_empty`` of a model built on ``meta``.

        Default torch initialisers per module, then the fixed parts: sin-cos tables, zero
        ``llm2vae``, identical experts.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.cfg.visual_gen:
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)
        return self.init_fresh()

    def shard_units(self) -> list[nn.Module]:
        """Modules to wrap one by one with FSDP (training.md 7), innermost first; the root keeps
        ``embed_tokens``, the final norms, ``lm_head``, ``vae2llm`` and ``llm2vae``."""
        units: list[nn.Module] = list(self.language_model.model.layers)
        if self.cfg.visual_und:
            units += list(self.vit_model.vision_model.encoder.layers)
            units += [self.vit_model.vision_model, self.connector, self.vit_pos_embed]
        if self.cfg.visual_gen:
            units += [self.time_embedder, self.latent_pos_embed]
        return units

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    # ------------------------------------------------------------ embeddings

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: Tensor, position_ids: Tensor, seqlens: list[int]) -> Tensor:
        """ViT patches -> SigLIP (26 layers + post-LN) -> connector -> + vit_pos_embed."""
        feats = self.vit_model(patches.to(self.dtype), position_ids, seqlens, self.attn_backend)
        return self.connector(feats) + self.vit_pos_embed(position_ids).to(feats.dtype)

    def embed_latents(self, x: Tensor, t: Tensor, position_ids: Tensor) -> Tensor:
        """vae2llm(x_t) + time_embedder(t) + latent_pos_embed[id] (model.md 5.3)."""
        x = self.vae2llm(x.to(self.dtype))
        return x + self.time_embedder(t).to(x.dtype) + self.latent_pos_embed(position_ids).to(x.dtype)

    # ------------------------------------------------------------ training forward

    def forward(
        self,
        sequence_length: int,
        sample_lens: list[int],
        packed_text_ids: Tensor,
        packed_text_indexes: Tensor,
        packed_position_ids: Tensor,
        split_lens: list[int] | None = None,
        attn_modes: list[str] | None = None,
        nested_attention_masks: list[Tensor] | None = None,
        padded_latent: Tensor | None = None,
        patchified_vae_latent_shapes: list[tuple[int, int]] | None = None,
        packed_latent_position_ids: Tensor | None = None,
        packed_vae_token_indexes: Tensor | None = None,
        packed_timesteps: Tensor | None = None,
        mse_loss_indexes: Tensor | None = None,
        packed_vit_tokens: Tensor | None = None,
        packed_vit_position_ids: Tensor | None = None,
        packed_vit_token_indexes: Tensor | None = None,
        vit_token_seqlens: Tensor | None = None,
        packed_label_ids: Tensor | None = None,
        ce_loss_indexes: Tensor | None = None,
        ce_loss_weights: Tensor | None = None,
        padded_images: Tensor | None = None,
        batch_data_indexes: list | None = None,
        noise_generator: torch.Generator | None = None,
        touch_unused: bool = False,
    ) -> BagelLossTerms:
        """Packed training forward; returns unreduced CE [N_ce] and MSE [N_mse, 64] terms.

        ``ce_loss_weights`` and ``batch_data_indexes`` are accepted (they travel in the batch) but
        used by the training loop, not here. ``touch_unused`` (data-parallel training): branches
        this pack does not use run on a one-token dummy *at the point where they would run*, so
        sharded modules gather their parameters in the same order on every rank, and their
        outputs enter ``zero`` (weighted 0), so every trainable parameter gets a gradient.
        """
        del ce_loss_weights, batch_data_indexes
        if padded_images is not None and padded_latent is None:
            raise ValueError("encode padded_images with the VAE first and pass them as padded_latent")
        if packed_vit_tokens is not None and packed_vit_tokens.numel() and not self.cfg.visual_und:
            raise ValueError("the batch has ViT tokens but the model was built with visual_und=False")
        if padded_latent is not None and not self.cfg.visual_gen:
            raise ValueError("the batch has VAE latents but the model was built with visual_gen=False")
        total = int(sum(sample_lens))  # includes the flex pad document when present
        device = packed_text_ids.device
        layout = self._layout(sample_lens, split_lens, attn_modes, nested_attention_masks, device)
        freeze_und = self.cfg.llm.freeze_und

        seq = torch.zeros(total, self.cfg.llm.hidden_size, dtype=self.dtype, device=device)
        text = self.embed_text(packed_text_ids)
        seq = seq.index_copy(0, packed_text_indexes, text.detach() if freeze_und else text)
        unused: list[Tensor] = []

        if packed_vit_tokens is not None and packed_vit_tokens.numel():
            seqlens = [int(n) for n in vit_token_seqlens.tolist()]
            vit = self.embed_vit(packed_vit_tokens, packed_vit_position_ids, seqlens)
            seq = seq.index_copy(0, packed_vit_token_indexes, vit.detach() if freeze_und else vit)
        elif touch_unused and self.cfg.visual_und:
            patch = torch.zeros(1, self.cfg.vit.patch_size**2 * 3, dtype=self.dtype, device=device)
            unused.append(self.embed_vit(patch, torch.zeros(1, dtype=torch.long, device=device), [1]))

        gen_idx = packed_vae_token_indexes if packed_vae_token_indexes is not None else None
        noise = x0 = t = None
        if padded_latent is not None and gen_idx is not None and gen_idx.numel():
            x0 = self.patchify_latents(padded_latent, patchified_vae_latent_shapes)
            t = torch.sigmoid(packed_timesteps.float())
            t = shift_timesteps(t, self.cfg.timestep_shift)
            if noise_generator is not None:
                noise = torch.randn(x0.shape, generator=noise_generator, device=noise_generator.device)
                noise = noise.to(x0)
            else:
                noise = torch.randn_like(x0)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            seq = seq.index_copy(0, gen_idx, self.embed_latents(x_t, t, packed_latent_position_ids))
            route = Routing.from_gen_indexes(gen_idx, total, detach_und=freeze_und)
        else:
            route = Routing(None, None, total, detach_und=freeze_und)
            if touch_unused and self.cfg.visual_gen:
                ids = torch.zeros(1, dtype=torch.long, device=device)
                latent = torch.zeros(1, self.cfg.patch_latent_dim, dtype=self.dtype, device=device)
                unused.append(self.embed_latents(latent, torch.zeros(1, device=device), ids))
        route.touch_absent = touch_unused

        position_ids = packed_position_ids
        if position_ids.numel() < total:  # flex pad document: ids beyond the real length
            position_ids = F.pad(position_ids, (0, total - position_ids.numel()))
        backend = self.attn_backend

        def attn(_layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return packed_attention(q, k, v, layout, backend)

        hidden = self.language_model.model(seq, position_ids, route, attn)

        ce = mse = None
        if ce_loss_indexes is not None and ce_loss_indexes.numel():
            logits = self.language_model.lm_head(hidden.index_select(0, ce_loss_indexes))
            ce = F.cross_entropy(logits.float(), packed_label_ids, reduction="none")
        if noise is not None and mse_loss_indexes is not None and mse_loss_indexes.numel():
            pred = self.llm2vae(hidden.index_select(0, mse_loss_indexes))
            has_mse = t > 0
            target = (noise - x0)[has_mse]
            mse = (pred.float() - target.float()) ** 2
        if touch_unused:
            if ce is None:
                unused.append(self.language_model.lm_head(hidden[:1]))
            if mse is None and self.cfg.visual_gen:
                unused.append(self.llm2vae(hidden[:1]))
        zero = sum((0.0 * u.float().sum() for u in unused), hidden.new_zeros((), dtype=torch.float32))
        return BagelLossTerms(ce=ce, mse=mse, zero=zero if touch_unused else None)

    def _layout(self, sample_lens, split_lens, attn_modes, nested_masks, device) -> PackedLayout:
        if split_lens is not None and attn_modes is not None:
            return PackedLayout.from_splits(sample_lens, split_lens, attn_modes, device)
        if nested_masks is not None:
            if self.attn_backend != "sdpa":
                raise ValueError(
                    f"attention backend {self.attn_backend!r} needs split_lens/attn_modes in the batch; "
                    "nested_attention_masks only serve the sdpa backend"
                )
            return PackedLayout.from_nested_masks(sample_lens, nested_masks, device)
        raise ValueError("the packed batch needs split_lens + attn_modes (or nested_attention_masks)")

    def patchify_latents(self, padded_latent: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """Crop each image's latent to (h·p, w·p) and patchify: [N_z, p²·C], images in order."""
        p = self.cfg.latent_patch_size
        tokens = [patchify(lat[:, : h * p, : w * p], p) for lat, (h, w) in zip(padded_latent, shapes)]
        return torch.cat(tokens, 0)

    # ------------------------------------------------------------ KV-cached inference step

    def forward_cached(
        self,
        embeds: Tensor,
        position_ids: Tensor,
        route: Routing,
        cache: KVCache,
        causal: bool,
        update_cache: bool,
    ) -> Tensor:
        """Run new tokens against a context cache (batch 1); optionally append their K/V."""
        n_new = embeds.shape[0]

        def attn(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            pk, pv = cache.get(layer)
            kk = k if pk is None else torch.cat([pk, k.to(pk.dtype)], 0)
            vv = v if pv is None else torch.cat([pv, v.to(pv.dtype)], 0)
            if update_cache:
                cache.append(layer, k, v)
            return cached_attention(q, kk.to(q.dtype), vv.to(q.dtype), n_new, causal)

        hidden = self.language_model.model(embeds.to(self.dtype), position_ids, route, attn)
        if update_cache:
            cache.length += n_new
        return hidden

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.llm.num_hidden_layers)


def build_model(cfg: BagelConfig, device: torch.device | str = "cpu", attn_backend: str = "sdpa") -> Bagel:
    """Build BAGEL; on ``meta`` nothing is allocated (shape/key checks, or load with assign)."""
    with torch.device(device):
        model = Bagel(cfg, attn_backend=attn_backend)
    if torch.device(device).type != "meta":
        model.init_fresh()
    return model
