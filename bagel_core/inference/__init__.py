"""BAGEL inference: ``setup_models`` and the KV-cached ``Inferencer`` (T2I, understanding, editing).

The names below load on first use (PEP 562), so ``bagel_core.inference.cli`` can build the
``bagel infer`` parser without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bagel_core.inference.inferencer import Guidance, Inferencer, cfg_active, cfg_combine, flow_timesteps
    from bagel_core.inference.setup import setup_models

_EXPORTS = {
    "Guidance": "bagel_core.inference.inferencer",
    "Inferencer": "bagel_core.inference.inferencer",
    "cfg_active": "bagel_core.inference.inferencer",
    "cfg_combine": "bagel_core.inference.inferencer",
    "flow_timesteps": "bagel_core.inference.inferencer",
    "setup_models": "bagel_core.inference.setup",
}
__all__ = ["Guidance", "Inferencer", "cfg_active", "cfg_combine", "flow_timesteps", "setup_models"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bagel_core.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
