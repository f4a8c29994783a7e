"""What a training run builds and where every weight comes from, decided before anything is built.

:func:`plan_weights` resolves upstream's resume flags (training.md 3 and 9.2) into one
:class:`WeightsPlan`, which ``--dry_run`` prints and the trainer follows:

1. ``--auto_resume True`` and a complete ``step_<N>`` in ``checkpoint_dir``: full resume from it.
2. else ``--resume_from D``: our step directory (honouring ``--resume_model_only`` and
   ``--finetune_from_ema``), an upstream step folder (weights only), or a released model directory
   (weights only, as the fine-tune recipe uses it).
3. else ``--model_path D`` when it is a model directory: its weights. Upstream's
   ``--finetune_from_hf True`` without a resume source silently starts the LLM and ViT from random
   weights; we load ``model_path`` instead and say so.
4. else pre-training from components when ``--llm_path`` is a directory: the Qwen2 LLM, the SigLIP
   ViT (``--vit_path``) and the FLUX VAE (``--vae_path``), with the generation expert copied from
   the understanding one (``--copy_init_moe``) and fresh adapters (``bagel_core.model.components``).
5. else a random model of ``--model_preset`` ("training from scratch").

Configs, the VAE and the tokenizer come from the resumed step directory, else from ``model_path``,
else the components, else the preset (random VAE, bundled tokenizer). Models that will receive loaded weights are built
on the ``meta`` device and materialised after sharding, so no rank ever holds a full random copy.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bagel_core.config.errors import ConfigError
from bagel_core.config.files import link_or_copy
from bagel_core.data.tokenizer import has_tokenizer_files
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import Bagel, build_model
from bagel_core.model.checkpoint_io import (
    LLM_CONFIG,
    VAE_WEIGHTS,
    fresh_position_tables,
    load_vae,
    read_config,
    read_weights,
    save_model_configs,
    weights_file,
    weights_keys,
)
from bagel_core.model.components import llm_config_from_hf, vit_config_from_hf, weights_from_components
from bagel_core.model.config import BagelConfig, ViTConfig, preset
from bagel_core.model.parallelize import apply_activation_checkpointing, apply_fsdp, mixed_precision
from bagel_core.train.args import TrainConfig
from bagel_core.train.checkpoint import MARKER, is_upstream_checkpoint, latest_checkpoint, load_full_weights
from bagel_core.train.distributed import Distributed
from bagel_core.train.lora import LoRA, adapter_ema, apply_lora, init_adapters, parameter_counts
from bagel_core.train.memory import FreezeFlags, frozen_reason

#: Storage dtype of parameters frozen by ``--freeze_*`` (compute runs in the mixed-precision policy's dtype).
FROZEN_DTYPE = torch.bfloat16

RANDOM, RESUME, CHECKPOINT, UPSTREAM, MODEL_DIR, COMPONENTS = (
    "random",
    "resume",
    "checkpoint",
    "upstream",
    "model_dir",
    "components",
)


@dataclass(frozen=True)
class WeightsPlan:
    """Where the run's configs, weights, EMA, optimizer state and data position come from."""

    kind: str  # RANDOM | RESUME | CHECKPOINT | UPSTREAM | MODEL_DIR | COMPONENTS
    source: Path | None  # the checkpoint / folder / model directory the weights come from
    config_dir: Path | None  # configs, VAE and tokenizer (None: the preset, a random VAE, bundled tokenizer)
    model_only: bool = False
    from_ema: bool = False
    note: str = ""
    vit_path: Path | None = None  # COMPONENTS: the SigLIP directory (source is the Qwen2 directory)
    vae_path: Path | None = None  # COMPONENTS: FLUX's ae.safetensors

    @property
    def loads_weights(self) -> bool:
        return self.kind != RANDOM

    @property
    def vae_file(self) -> Path | None:
        """FLUX's ``ae.safetensors`` for this run, None for a random VAE."""
        if self.vae_path is not None:
            return self.vae_path
        if self.config_dir is not None and (Path(self.config_dir) / VAE_WEIGHTS).is_file():
            return Path(self.config_dir) / VAE_WEIGHTS
        return None

    @property
    def tokenizer_dir(self) -> Path | None:
        """The folder whose tokenizer files the run uses, None for the bundled Qwen2.5 tokenizer."""
        for folder in (self.config_dir, self.source if self.kind == COMPONENTS else None):
            if folder is not None and has_tokenizer_files(folder):
                return Path(folder)
        return None

    def describe(self, preset_name: str) -> dict[str, str]:
        """One line per piece of state, for ``--dry_run`` and the start-up log."""
        configs = f"{self.config_dir}" if self.config_dir else f"preset {preset_name!r}"
        full = self.kind == RESUME or (self.kind == CHECKPOINT and not self.model_only)
        weights = {
            RANDOM: f"random initialisation of preset {preset_name!r} (training from scratch)",
            RESUME: f"{self.source} (model)",
            CHECKPOINT: f"{self.source} ({'EMA' if self.model_only and self.from_ema else 'model'})",
            UPSTREAM: f"upstream folder {self.source}",
            MODEL_DIR: f"{self.source}",
            COMPONENTS: f"LLM {self.source}, ViT {self.vit_path}; connector, timestep embedder, vae2llm, "
            "llm2vae and sin-cos tables fresh",
        }[self.kind]
        return {
            "configs": configs,
            "model weights": weights,
            "EMA": f"{self.source} (EMA)" if full else "a copy of the model weights",
            "optimizer + schedule": f"{self.source}" if full else "fresh (step 0)",
            "data position": f"{self.source} (same world size) or restart" if full else "start of the data",
            "VAE": str(self.vae_file or "random FLUX-shaped VAE (no ae.safetensors)"),
            "tokenizer": str(self.tokenizer_dir or "bundled Qwen2.5"),
            "note": self.note,
        }


def _is_model_dir(d: Path) -> bool:
    return d.is_dir() and (d / LLM_CONFIG).is_file()


def plan_weights(cfg: TrainConfig) -> WeightsPlan:
    """Resolve the resume flags (module docstring); raises ConfigError naming a missing path."""
    m, t = cfg.model, cfg.training
    model_dir = Path(m.model_path)
    if "model_path" in cfg.given and not _is_model_dir(model_dir):
        raise ConfigError(
            f"--model_path {model_dir}: not a BAGEL model directory (no {LLM_CONFIG}); pass the released "
            "BAGEL-7B-MoT folder, or drop --model_path and use --model_preset for a random model"
        )
    configs = model_dir if _is_model_dir(model_dir) else None
    latest = latest_checkpoint(t.checkpoint_dir) if t.auto_resume else None
    if latest is not None:
        return WeightsPlan(RESUME, latest, latest, note="auto_resume: full resume from the newest complete step")
    if t.resume_from:
        src = Path(t.resume_from)
        if (src / MARKER).is_file():
            return WeightsPlan(CHECKPOINT, src, src, t.resume_model_only, t.resume_model_only and t.finetune_from_ema)
        if _is_model_dir(src):
            return WeightsPlan(MODEL_DIR, src, src, True, True, note=f"--resume_from {src} is a model directory")
        if is_upstream_checkpoint(src):
            return WeightsPlan(UPSTREAM, src, configs, True, t.finetune_from_ema)
        raise ConfigError(
            f"--resume_from {src}: neither a complete step directory (no {MARKER}), a BAGEL model directory, "
            "nor an upstream checkpoint folder (model.safetensors / ema.safetensors); check the path"
        )
    if configs is not None:
        note = (
            "--finetune_from_hf True without --resume_from: upstream would start the LLM and ViT from random "
            f"weights; loading them from {configs} instead"
            if t.finetune_from_hf
            else ""
        )
        return WeightsPlan(MODEL_DIR, configs, configs, True, True, note=note)
    llm = Path(m.llm_path)
    if llm.is_dir() or "llm_path" in cfg.given:
        return _components_plan(cfg, llm)
    return WeightsPlan(RANDOM, None, None)


def _components_plan(cfg: TrainConfig, llm: Path) -> WeightsPlan:
    """Pre-training from separate Qwen2 / SigLIP / FLUX checkpoints; every path must exist."""
    m, t = cfg.model, cfg.training
    vit, vae = Path(m.vit_path), Path(m.vae_path)
    needed = [("llm_path", llm, llm.is_dir())]
    if t.visual_und:
        needed.append(("vit_path", vit, vit.is_dir()))
    if t.visual_gen:
        needed.append(("vae_path", vae, vae.is_file()))
    for flag, path, ok in needed:
        if not ok:
            raise ConfigError(
                f"--{flag} {path} does not exist: pre-training from components needs the Qwen2 directory "
                "(--llm_path), the SigLIP directory (--vit_path) and FLUX's ae.safetensors (--vae_path); "
                "or fine-tune a BAGEL model directory with --model_path"
            )
    note = (
        "copy_init_moe: the generation expert starts as a copy of the understanding expert" if t.copy_init_moe else ""
    )
    return WeightsPlan(
        COMPONENTS, llm, None, True, False, note=note,
        vit_path=vit if t.visual_und else None, vae_path=vae if t.visual_gen else None,
    )  # fmt: skip


def model_config(cfg: TrainConfig, plan: WeightsPlan) -> BagelConfig:
    """The model's configuration: the config directory's JSON (or the preset) with the run's flags."""
    m, t = cfg.model, cfg.training
    if plan.kind == COMPONENTS:
        base = BagelConfig(
            llm=llm_config_from_hf(plan.source, m.layer_module, m.llm_qk_norm, m.tie_word_embeddings),
            vit=vit_config_from_hf(plan.vit_path, m.vit_select_layer) if plan.vit_path else ViTConfig(),
            latent_patch_size=m.latent_patch_size,
            max_latent_size=m.max_latent_size,
            vit_max_num_patch_per_side=m.vit_max_num_patch_per_side,
            connector_act=m.connector_act,
        )
    else:
        base = read_config(plan.config_dir) if plan.config_dir else preset(m.model_preset)
    llm = dataclasses.replace(base.llm, freeze_und=t.freeze_und)
    max_latent = m.max_latent_size if "max_latent_size" in cfg.given else None  # else the checkpoint's/preset's
    return dataclasses.replace(
        base,
        llm=llm,
        visual_gen=t.visual_gen,
        visual_und=t.visual_und,
        timestep_shift=t.timestep_shift,
        interpolate_pos=m.interpolate_pos,
        max_latent_size=max_latent if max_latent is not None else base.max_latent_size,
    )


def check_weights(plan: WeightsPlan, bcfg: BagelConfig) -> None:
    """Header-only checks of the weights file the plan loads (keys, shapes, table sizes), before launch."""
    if plan.kind == MODEL_DIR:
        weights_keys(weights_file(plan.source, "ema" if plan.from_ema else None), bcfg)


def freeze(model: Bagel, cfg: TrainConfig) -> None:
    """``--freeze_llm`` / ``--freeze_vit`` / ``--freeze_und`` (training.md 7) so that they save memory: every
    parameter :func:`~bagel_core.train.memory.frozen_reason` names stops requiring gradients (so it gets no
    gradient, no AdamW state and no EMA update) and those frozen by a flag are stored in bf16, in the model and
    in its EMA copy (a 14.6 B model's frozen understanding half then takes 2 bytes per parameter twice, not 20).

    On GPU the forward already ran them in bf16 (FSDP2 casts every parameter to the bf16 compute dtype), so
    training is unchanged; on CPU they are gathered back to fp32 for compute. ``freeze_und`` also detaches
    the understanding paths in the model (its config flag); the parameters behind those paths never receive
    a gradient, so freezing them changes nothing but the memory. The sin-cos tables were frozen already and
    stay fp32 (recomputed exactly)."""
    t = cfg.training
    flags = FreezeFlags(t.freeze_llm, t.freeze_vit, t.freeze_und)
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            reason = frozen_reason(f"{module_name}.{name}" if module_name else name, model.cfg.llm, flags)
            if reason is None:
                continue
            if reason == "table":
                param.requires_grad_(False)
                continue
            module._parameters[name] = torch.nn.Parameter(param.detach().to(FROZEN_DTYPE), requires_grad=False)


def build_models(
    cfg: TrainConfig, plan: WeightsPlan, bcfg: BagelConfig, dist_info: Distributed
) -> tuple[Bagel, torch.nn.Module, str]:
    """(model, EMA, a log line): built, frozen, checkpointed, sharded and materialised. With LoRA the EMA is
    :class:`~bagel_core.train.lora.AdapterEMA` (the adapters only).

    A model that receives weights is built on ``meta``; a random one on the CPU with the global seed
    (identical on every rank before sharding).
    """
    m, t = cfg.model, cfg.training
    device = "meta" if plan.loads_weights else "cpu"
    with torch.random.fork_rng(devices=[]):  # the same random init on every rank and for every world size
        torch.manual_seed(t.global_seed)
        model = build_model(bcfg, device, attn_backend=m.attn_backend)
    freeze(model, cfg)
    lora = LoRA.from_args(t)
    if lora.enabled:  # every base weight frozen in bf16; fp32 adapters (peft) on the targets (lora.py)
        apply_lora(model, lora, bcfg.llm)
    # with LoRA the EMA holds the adapters only (adapter_ema below): the frozen base would be a second copy
    ema = None if lora.enabled else copy.deepcopy(model).requires_grad_(False)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model, preserve_rng_state=lora.dropout > 0)
    apply_fsdp(
        model,
        dist_info.mesh,
        mixed_precision(dist_info.device),
        cpu_offload=t.cpu_offload,
        reshard_after_forward=t.sharding_strategy != "NO_SHARD",
    )
    if ema is not None:
        apply_fsdp(ema, dist_info.mesh, cpu_offload=t.cpu_offload)
    target = torch.device("cpu") if t.cpu_offload else dist_info.device
    if plan.loads_weights:
        model.to_empty(device=target)
        if ema is not None:
            ema.to_empty(device=target)
    if lora.enabled:  # the same start on every rank and for every world size; loads below fill only the base
        init_adapters(model, t.global_seed)
    message = f"Model parameter count: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B (sharded view)"
    if plan.kind == MODEL_DIR:
        path = weights_file(plan.source, "ema" if plan.from_ema else None)
        full = fresh_position_tables(read_weights(path, bcfg), bcfg) if dist_info.is_main else None
        load_full_weights(model, full, dist_info)
        if ema is not None:
            load_full_weights(ema, full, dist_info)
        del full
        message += f"; weights from {path} (sin-cos tables recomputed in fp32)"
    elif plan.kind == COMPONENTS:
        full = None
        if dist_info.is_main:
            with torch.random.fork_rng(devices=[]):  # the fresh adapters: the same for every world size
                torch.manual_seed(t.global_seed)
                full = weights_from_components(bcfg, plan.source, plan.vit_path, t.copy_init_moe)
        load_full_weights(model, full, dist_info)
        if ema is not None:
            load_full_weights(ema, full, dist_info)
        del full
        message += f"; LLM from {plan.source}, ViT from {plan.vit_path}, adapters fresh"
    if ema is None:
        ema = adapter_ema(model)
        trainable, total = parameter_counts(model)
        message += f"; {lora.describe()}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%)"
        if plan.kind == RANDOM and bcfg.visual_gen:
            message += (
                "; WARNING: LoRA on a random model: its llm2vae is zero and frozen, so no adapter gets an MSE gradient "
                "(start from a trained model with --model_path)"
            )
    return model, ema, message


def build_vae(plan: WeightsPlan, bcfg: BagelConfig, device: torch.device, seed: int) -> AutoEncoder:
    """The frozen FLUX VAE: the plan's ``ae.safetensors``, else random with ``seed`` (tests, presets;
    identical on every rank)."""
    if plan.vae_file is not None:
        vae = load_vae(plan.vae_file, bcfg, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoEncoder(bcfg.vae).to(device)
    if device.type == "cuda":
        # bf16, channels-last convolutions (the GPU's fast layout). Not on CPU: there oneDNN's channels-last
        # kernels (about 1.7x faster) give results that depend on the thread count, which would break "two
        # processes train what one process trains" (tests/test_train_distributed.py)
        vae = vae.to(torch.bfloat16, memory_format=torch.channels_last)
    return vae.eval().requires_grad_(False)


def model_files_writer(bcfg: BagelConfig, vae: AutoEncoder, plan: WeightsPlan, tokenizer):
    """A function writing configs, ``ae.safetensors`` and tokenizer files into a step directory."""
    source_vae = plan.vae_file

    def write(out: Path) -> None:
        save_model_configs(out, bcfg)
        target = out / VAE_WEIGHTS
        if source_vae is not None and source_vae.is_file():
            link_or_copy(source_vae, target)
        else:
            save_file({k: v.float().contiguous().cpu() for k, v in vae.state_dict().items()}, str(target))
        tokenizer.save_pretrained(str(out))

    return write
