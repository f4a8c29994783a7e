"""Training checkpoints: ``<checkpoint_dir>/step_<N>/`` holding the state after N optimizer steps.

Layout (single process, world size 1): ``model.safetensors`` and ``ema.safetensors`` (fp32, with the
HF-format config JSONs of :func:`save_model_dir`), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``,
``data_state.pt`` (``PackedDataset.state_dict()``), ``data_status.pt`` (upstream shape: a list indexed
by rank of ``{group: {worker_id: cursor}}``), ``train_state.json`` and, written last, ``COMPLETE``.
Everything is written into ``.step_<N>.tmp`` and renamed once the marker exists, so a crash never
leaves a ``step_<N>`` directory that resume would pick up half-written; a ``step_<N>`` without the
marker is ignored anyway. The ``.pt`` files hold only our own tensors and plain data and are loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from bagel_core.config.errors import ConfigError
from bagel_core.model.checkpoint_io import save_model_dir

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def complete_steps(root: str | Path) -> list[int]:
    """Steps with a complete directory (marker present), ascending; other entries are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str | Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_state: dict[str, Any],
    keep_last_k: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``step_<step>`` atomically (temp dir + marker + rename), then apply ``keep_last_k``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_dir(tmp, model, weights_name=MODEL_FILE, dtype=torch.float32)
    save_model_dir(tmp, model, weights_name=EMA_FILE, dtype=torch.float32, state_dict=ema.state_dict())
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    torch.save(data_state, tmp / "data_state.pt")
    torch.save([data_state.get("data_status", {})], tmp / "data_status.pt")
    (tmp / "train_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2, sort_keys=True))
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last_k > 0:
        for old in complete_steps(root)[:-keep_last_k]:
            shutil.rmtree(step_dir(root, old))
    return final


def _load_weights(module: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    model_only: bool = False,
    from_ema: bool = False,
) -> tuple[int, dict[str, Any] | None]:
    """Restore from a complete step directory. Returns (next step, data state or None).

    ``model_only``: weights only (from ``ema.safetensors`` when ``from_ema``), step 0, no data state.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ConfigError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    ema_file = path / EMA_FILE if (path / EMA_FILE).is_file() else path / MODEL_FILE
    _load_weights(model, ema_file if (model_only and from_ema) else path / MODEL_FILE)
    _load_weights(ema, ema_file)
    if model_only:
        return 0, None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    data_state = torch.load(path / "data_state.pt", weights_only=True)
    step = json.loads((path / "train_state.json").read_text())["step"]
    return int(step), data_state
