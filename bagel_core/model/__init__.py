"""BAGEL model: Qwen2 MoT LLM, SigLIP NaViT, FLUX autoencoder, adapters, attention backends, I/O.

Pure torch; never imports dagster. Submodules: ``config`` (dataclasses, presets), ``attention``,
``qwen2_mot``, ``siglip_navit``, ``autoencoder``, ``embeddings``, ``bagel``, ``checkpoint_io``.
"""

from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import Bagel, BagelLossTerms, build_model, shift_timesteps
from bagel_core.model.checkpoint_io import load_model_dir, load_vae, read_config, save_model_dir
from bagel_core.model.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig, preset

__all__ = [
    "AutoEncoder",
    "Bagel",
    "BagelConfig",
    "BagelLossTerms",
    "LLMConfig",
    "VAEConfig",
    "ViTConfig",
    "build_model",
    "load_model_dir",
    "load_vae",
    "preset",
    "read_config",
    "save_model_dir",
    "shift_timesteps",
]
