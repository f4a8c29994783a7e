"""Training checkpoints: ``<checkpoint_dir>/step_<N>/`` holds the state after N optimizer steps.

Layout (any world size):

* ``.metadata`` + ``__<rank>_<i>.distcp`` -- ``torch.distributed.checkpoint`` (DCP) of
  ``{"model", "ema", "optimizer"}``; every rank writes its own shards, so saving never gathers a full
  model on one rank (upstream's OOM at save, training.md 11). Model/EMA keys are the released ones.
* ``scheduler.pt``; ``rng/rank_<r>.pt`` and ``data/rank_<r>.pt`` (per-rank RNG and
  ``PackedDataset.state_dict()``); ``data_status.pt`` (upstream's shape: a list by rank of
  ``{group: {worker_id: cursor}}``); ``train_state.json`` (step, world size, mesh, config).
* ``llm_config.json``, ``vit_config.json``, ``bagel_config.json``, ``ae.safetensors`` and the tokenizer
  files (``write_model_files``), so ``bagel export`` and inference need nothing else.
* ``COMPLETE``, written last.

Atomicity: all ranks write into ``.step_<N>.tmp``; after a barrier rank 0 writes the rest, fsyncs,
writes the marker, and renames the directory into place (an existing ``step_<N>`` is moved aside and
deleted only after its replacement is complete). ``auto_resume`` only ever considers directories
with the marker, so a save killed at any point leaves the previous checkpoint as the latest.
``keep_last_k`` deletes the oldest complete ones after a successful save.

Loading reshards: DCP restores model, EMA and optimizer for any world size. RNG and data position
are per rank, so they are restored only for the same world size; otherwise the data order restarts
and the caller says so. An upstream checkpoint folder (``0001000/`` with ``model.safetensors`` /
``ema.safetensors``) is accepted as a weights-only starting point.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from bagel_core.config.errors import CheckpointSaveError, ConfigError
from bagel_core.train.distributed import Distributed, barrier, broadcast_object
from bagel_core.train.lora import released_sources

MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"
UPSTREAM_WEIGHTS = ("model.safetensors", "ema.safetensors")
_STEP_RE = re.compile(r"^step_(\d+)$")


# ---- finding checkpoints ---------------------------------------------------------------------------
def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def complete_steps(root: str | Path) -> list[int]:
    """Steps with a complete directory (marker present), ascending; everything else is ignored."""
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


def is_upstream_checkpoint(path: Path) -> bool:
    """Upstream's step folder (``0001000/``): safetensors weights, no marker, no DCP metadata."""
    return path.is_dir() and not (path / MARKER).exists() and any((path / n).is_file() for n in UPSTREAM_WEIGHTS)


# ---- RNG ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(internal),
        "python_version": version,
        "python_gauss": gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving ------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_local(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rank_file(kind: str, rank: int) -> str:
    return f"{kind}/rank_{rank:05d}.pt"


@dataclass
class TrainingState:
    """Everything a step directory restores; the modules are the live (possibly sharded) ones."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def _weights_state(state: TrainingState, with_optimizer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"model": get_model_state_dict(state.model), "ema": get_model_state_dict(state.ema)}
    if with_optimizer:
        out["optimizer"] = get_optimizer_state_dict(state.model, state.optimizer)
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    state: TrainingState,
    data_state: dict[str, Any],
    dist_info: Distributed,
    write_model_files: Callable[[Path], None],
    keep_last_k: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``step_<step>`` atomically on every rank (a collective: all ranks call it). A write that fails (full
    disk, quota) removes the partial folder and raises :class:`CheckpointSaveError` naming the space needed."""
    root = Path(root)
    try:
        return _save_checkpoint(root, step, state, data_state, dist_info, write_model_files, keep_last_k, extra)
    except Exception as exc:
        if not _is_space_error(exc):
            raise
        tmp = root / f".step_{step}.tmp"
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_space_message(root, step, exc)) from exc


def _is_space_error(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain (DCP wraps a rank's OSError in its own exception, as text)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _space_message(root: Path, step: int, exc: BaseException) -> str:
    free = shutil.disk_usage(root).free if root.exists() else 0
    previous = complete_steps(root)
    needed = sum(p.stat().st_size for p in step_dir(root, previous[-1]).rglob("*") if p.is_file()) if previous else 0
    kept = f"step_{previous[-1]} is complete and untouched" if previous else "no earlier checkpoint exists"
    need = f"about {needed / 2**30:.2f} GiB (the size of step_{previous[-1]})" if previous else "more"
    return (
        f"saving step {step} into {root} failed: the disk is full ({free / 2**30:.2f} GiB free, {need} needed per "
        f"checkpoint; {type(exc).__name__}). The partial folder was removed and {kept}. Free space, lower "
        "--keep_last_k, or point --checkpoint_dir at a bigger disk, then resume with --auto_resume True"
    )


def _save_checkpoint(
    root: Path,
    step: int,
    state: TrainingState,
    data_state: dict[str, Any],
    dist_info: Distributed,
    write_model_files: Callable[[Path], None],
    keep_last_k: int,
    extra: dict[str, Any] | None,
) -> Path:
    final, tmp = step_dir(root, step), root / f".step_{step}.tmp"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(dist_info)
    dcp.save(_weights_state(state, with_optimizer=True), checkpoint_id=str(tmp))
    _save_local(rng_state(), tmp / _rank_file("rng", dist_info.rank))
    _save_local(data_state, tmp / _rank_file("data", dist_info.rank))
    barrier(dist_info)
    if dist_info.is_main:
        _save_local(state.scheduler.state_dict(), tmp / "scheduler.pt")
        statuses = [
            torch.load(tmp / _rank_file("data", r), weights_only=True).get("data_status", {})
            for r in range(dist_info.world_size)
        ]
        _save_local(statuses, tmp / "data_status.pt")
        write_model_files(tmp)
        info = {"step": step, "world_size": dist_info.world_size, **(extra or {})}
        (tmp / TRAIN_STATE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        for path in tmp.rglob("*"):
            _fsync(path)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync(tmp / MARKER)
        _fsync(tmp)
        old = root / f".step_{step}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last_k > 0:
            for done in complete_steps(root)[:-keep_last_k]:
                shutil.rmtree(step_dir(root, done), ignore_errors=True)
    barrier(dist_info)
    return final


# ---- loading -----------------------------------------------------------------------------------------
@dataclass
class Restored:
    """What a load restored: the next step, this rank's data state (None: start the data fresh), and
    a sentence for the log."""

    step: int
    data_state: dict[str, Any] | None
    note: str


def read_train_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable {TRAIN_STATE} ({exc}); pick another checkpoint") from exc


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) admitting only DCP's own classes, tensor sizes, dtypes, layouts and
    paths: anything else (``os.system``, ``builtins.eval``, ...) is refused before it can run."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if _allowed_global(module, name) else None
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
        return obj


def _allowed_global(module: str, name: str) -> bool:
    if module.startswith("torch.distributed.checkpoint."):
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }


def check_checkpoint_files(path: Path) -> None:
    """Refuse a checkpoint folder that could make loading it do harm: a link pointing outside the folder, or a
    DCP ``.metadata`` whose pickle names anything but DCP's own types (``dcp.load`` would unpickle it
    unrestricted). The ``.pt`` files are read with ``weights_only=True`` (see :func:`load_pt`)."""
    root = path.resolve()
    for item in path.rglob("*"):
        if item.is_symlink() and not item.resolve().is_relative_to(root):
            raise ConfigError(f"{item}: a link to {item.resolve()}, outside the checkpoint {path}; refused")
    metadata = path / DCP_METADATA
    if metadata.is_file():
        try:
            with open(metadata, "rb") as handle:
                _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
            raise ConfigError(f"{metadata}: refused to load ({exc}); not DCP metadata written by torch") from exc


def load_pt(file: Path) -> Any:
    """``torch.load`` of our small state files, tensors and plain containers only."""
    try:
        with warnings.catch_warnings():  # a foreign protocol is reported as the refusal below, not as a warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{file}: refused to load: it holds Python objects other than tensors and plain values, which could run "
            "code; regenerate the checkpoint or remove the file"
        ) from exc


def load_checkpoint(
    path: str | Path,
    state: TrainingState,
    dist_info: Distributed,
    model_only: bool = False,
    from_ema: bool = False,
) -> Restored:
    """Restore from a complete ``step_<N>`` (or an upstream folder, weights only).

    ``model_only``: weights only (the model from the EMA when ``from_ema``), step 0, fresh data.
    """
    path = Path(path)
    if is_upstream_checkpoint(path):
        return _load_upstream(path, state, dist_info, from_ema)
    if not (path / MARKER).is_file() or not (path / DCP_METADATA).is_file():
        raise ConfigError(
            f"{path}: not a complete checkpoint (no {MARKER} marker or no DCP {DCP_METADATA}); "
            "use a step_<N> directory written by this trainer, or an upstream folder with model.safetensors"
        )
    check_checkpoint_files(path)
    saved = read_train_state(path)
    weights = _weights_state(state, with_optimizer=not model_only)
    dcp.load(weights, checkpoint_id=str(path))
    if model_only and from_ema and weights["ema"].keys() != weights["model"].keys():
        # LoRA: the EMA holds the adapters only; the frozen base comes from the model
        set_model_state_dict(state.model, weights["model"])
        set_model_state_dict(state.model, weights["ema"], options=StateDictOptions(strict=False))
    else:
        set_model_state_dict(state.model, weights["ema" if (model_only and from_ema) else "model"])
    set_model_state_dict(state.ema, weights["ema"])
    if model_only:
        source = "EMA" if from_ema else "model"
        return Restored(0, None, f"weights from {path} ({source}); optimizer, schedule and data start fresh")
    set_optimizer_state_dict(state.model, state.optimizer, weights["optimizer"])
    state.scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    step = int(saved["step"])
    if int(saved.get("world_size", 1)) != dist_info.world_size:
        return Restored(
            step,
            None,
            f"resumed {path} at step {step}: model, EMA and optimizer resharded from world size "
            f"{saved.get('world_size')} to {dist_info.world_size}; the data order restarts (each rank's "
            "data position belongs to the old world size), so this is not an exact continuation",
        )
    set_rng_state(load_pt(path / _rank_file("rng", dist_info.rank)))
    data_state = load_pt(path / _rank_file("data", dist_info.rank))
    return Restored(step, data_state, f"resumed {path} at step {step} (exact: same world size)")


def saved_data_positions(path: str | Path, world_size: int) -> tuple[int, list[dict[str, Any]]] | None:
    """``(step, every rank's data state)`` that a full resume from the step directory ``path`` restores at
    ``world_size`` (what :func:`load_checkpoint` gives each rank); None when such a resume starts the data
    afresh (an upstream folder, another world size)."""
    path = Path(path)
    if is_upstream_checkpoint(path) or not (path / MARKER).is_file():
        return None
    saved = read_train_state(path)
    if int(saved.get("world_size", 1)) != world_size:
        return None
    return int(saved["step"]), [load_pt(path / _rank_file("data", rank)) for rank in range(world_size)]


@torch.no_grad()
def load_full_weights(model: nn.Module, full: dict[str, torch.Tensor] | None, dist_info: Distributed) -> None:
    """Load a full (unsharded) state dict held by rank 0 into a possibly sharded model.

    Tensor by tensor, rank 0 broadcasts the full tensor and every rank keeps its own shard, so host
    memory holds one full copy (rank 0's), not one per rank (upstream's start-up OOM, training.md 11).
    Keys must match exactly; the error names the differences. A model with LoRA adapters takes its base weights
    under their released names (``q_proj.base_layer.weight`` from ``q_proj.weight``) and keeps its adapters.
    """
    targets = model.state_dict()
    released = released_sources(targets)
    if released is not None:
        targets = {released[k]: v for k, v in targets.items() if released[k] is not None}
        if not targets:  # the EMA of a LoRA run (adapters only): nothing to take from a full state dict
            return
    keys = broadcast_object(sorted(full) if dist_info.is_main and full is not None else None, dist_info)
    missing, unexpected = sorted(set(targets) - set(keys)), sorted(set(keys) - set(targets))
    if missing or unexpected:
        raise ConfigError(f"weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, target in targets.items():
        local = target.to_local() if isinstance(target, DTensor) else target
        if dist_info.is_main:
            value = full[key].to(device=dist_info.device, dtype=target.dtype)
        else:
            value = torch.empty(target.shape, dtype=target.dtype, device=dist_info.device)
        if dist_info.world_size > 1:
            torch.distributed.broadcast(value, src=0)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
        local.copy_(value)


def _load_upstream(path: Path, state: TrainingState, dist_info: Distributed, from_ema: bool) -> Restored:
    check_checkpoint_files(path)
    model_file = path / "model.safetensors"
    ema_file = path / "ema.safetensors" if (path / "ema.safetensors").is_file() else model_file
    first = ema_file if (from_ema or not model_file.is_file()) else model_file
    for module, file in ((state.model, first), (state.ema, ema_file)):
        load_full_weights(module, load_file(str(file)) if dist_info.is_main else None, dist_info)
    note = broadcast_object(
        f"weights from upstream checkpoint {path} (model from {first.name}, EMA from {ema_file.name}); upstream's "
        "FSDP1 optimizer shards cannot be read, so optimizer, schedule and data start fresh at step 0",
        dist_info,
    )
    return Restored(0, None, str(note))
