"""BAGEL inference: ``setup_models`` and the KV-cached ``Inferencer`` (T2I, understanding, editing)."""

from bagel_core.inference.inferencer import Guidance, Inferencer, cfg_active, cfg_combine, flow_timesteps
from bagel_core.inference.setup import setup_models

__all__ = ["Guidance", "Inferencer", "cfg_active", "cfg_combine", "flow_timesteps", "setup_models"]
