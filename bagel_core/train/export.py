"""Export a training checkpoint as an inference-ready directory in the released BAGEL layout.

    export_checkpoint(checkpoint_dir / "step_1000", Path("exports/bagel-step1000"))

reads a complete training step directory (``torch.distributed.checkpoint`` files of
``{"model": ..., "ema": ..., "optimizer": ...}``, the config JSONs, ``ae.safetensors``, tokenizer
files when the run had a tokenizer directory, ``train_state.json`` and the ``COMPLETE`` marker) and
writes ``out/`` with ``llm_config.json``, ``vit_config.json``, ``bagel_config.json`` (when the source
has it), ``ema.safetensors`` (bf16 by default), ``ae.safetensors`` and the tokenizer files: what
:func:`bagel_core.inference.setup_models` and upstream's inference load.

How it avoids the upstream OOM (a full fp32 gather of 2 x 58 GB for 7B): BAGEL is built on the
``meta`` device from the configs, which gives every key, shape and dtype without allocating; the
DCP metadata is checked against exactly that key set (missing / unexpected keys and wrong shapes
are named before any tensor is read); then the tensors are read single-process (no process group)
in chunks of about ``chunk_bytes`` of stored (fp32) data, DCP reading only the keys of the chunk,
and each chunk is cast to ``dtype`` before the next is read. Peak host memory is the output (29 GB
in bf16 for 7B) plus one chunk.

The output file is always named ``ema.safetensors`` (the release has only that file, and loaders
look for it first), whichever weights were exported; its safetensors metadata records
``{"format": "pt", "source": <checkpoint>, "weights": "ema"|"model", "step": "<N>"}``.
Everything is written into ``out.parent/.<name>.tmp`` and renamed to ``out`` at the end, so a
half-written export is never mistaken for a model.

Upstream checkpoints: a folder written by upstream's training script (``0001000/`` with fp32
``model.safetensors`` and/or ``ema.safetensors``, no marker, no configs, VAE or tokenizer) exports
with ``config_from=<a model directory>`` (e.g. the released BAGEL-7B-MoT download) that supplies
the configs, ``ae.safetensors`` and tokenizer files; the weights are read one tensor at a time and
cast. ``config_from`` may also be given for a DCP step directory, to take configs, VAE and tokenizer
from elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from bagel_core.config.errors import ConfigError
from bagel_core.config.files import link_or_copy
from bagel_core.data.tokenizer import has_tokenizer_files
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import build_model
from bagel_core.model.checkpoint_io import (
    EMA_WEIGHTS,
    EXTRA_CONFIG,
    LLM_CONFIG,
    MODEL_WEIGHTS,
    VAE_WEIGHTS,
    VIT_CONFIG,
    check_keys,
    expected_shapes,
    header_shapes,
    key_listing,
    read_config,
)
from bagel_core.model.config import BagelConfig
from bagel_core.train.checkpoint import DCP_METADATA, MARKER, TRAIN_STATE, check_checkpoint_files, latest_checkpoint
from bagel_core.train.lora import (
    ADAPTER,
    ADAPTER_WEIGHTS,
    LoRA,
    adapter_file_key,
    is_adapter_key,
    merge,
    saved_lora,
)

Weights = Literal["ema", "model"]

#: Tokenizer files copied when the source directory has a tokenizer (tokenizer.json or vocab.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_CHUNK_BYTES = 2 << 30
_STEP_NAME = re.compile(r"^(?:step_)?(\d+)$")
# dcp.load warns on every single-process load; that is exactly what we mean to do.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

Progress = Callable[[int, int], None]


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    weights: Weights = "ema",
    dtype: torch.dtype = torch.bfloat16,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    config_from: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    adapter_only: bool = False,
) -> Path:
    """Write ``out`` (released layout) from a training checkpoint; returns ``out``.

    ``checkpoint``: a complete DCP step directory (``COMPLETE`` marker, ``.metadata``, configs,
    ``ae.safetensors``), or, with ``config_from``, an upstream folder of fp32 safetensors.
    ``weights``: the ``"ema"`` (default, what the release ships) or the raw ``"model"`` weights.
    ``dtype``: of the floating-point tensors written (bf16 = the release; fp32 keeps full precision).
    ``chunk_bytes``: stored bytes read per DCP load (memory peak = output + one chunk).
    ``config_from``: directory with ``llm_config.json``, ``vit_config.json`` (+ ``bagel_config.json``),
    ``ae.safetensors`` and optional tokenizer files, used instead of the checkpoint's own.
    ``overwrite``: replace an existing non-empty ``out`` (otherwise a ConfigError).
    ``progress``: called as ``progress(bytes_done, bytes_total)`` after each chunk.
    ``adapter_only``: a LoRA checkpoint's adapters alone, in peft's format (``adapter_model.safetensors`` +
    ``adapter_config.json``) instead of the merged model; a LoRA checkpoint otherwise exports merged weights
    (``W + alpha / rank * B @ A`` in fp32, then ``dtype``) under the released names.
    Errors are :class:`ConfigError` naming the path and the fix.
    """
    checkpoint = Path(checkpoint)
    out = Path(out)
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights must be 'ema' or 'model', not {weights!r}")
    if chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {checkpoint} is not a directory (expected checkpoint_dir/step_<N>/)")
    source_dir = Path(config_from) if config_from is not None else checkpoint
    is_dcp = (checkpoint / DCP_METADATA).is_file()
    if config_from is None:
        _check_training_layout(checkpoint)
    elif is_dcp:
        _require_marker(checkpoint)
    _check_out(out, checkpoint, source_dir, overwrite)

    cfg = _read_source_config(source_dir)
    expected = _expected(cfg)
    _check_vae(source_dir, cfg)
    step = _step_of(checkpoint)
    lora = _lora_of(checkpoint) if is_dcp else LoRA()
    if adapter_only and not lora.enabled:
        raise ConfigError(
            f"{checkpoint} was not trained with LoRA (--lora_rank 0): it has no adapter to export; drop --adapter-only"
        )
    if adapter_only:
        return _export_adapter(checkpoint, out, weights, dtype, lora, source_dir, step, overwrite)
    if lora.enabled:
        read = _LoraDcpWeights(checkpoint, weights, expected, lora)
    elif is_dcp:
        read = _DcpWeights(checkpoint, weights, expected)
    else:
        read = _SafetensorsWeights(checkpoint, weights, expected)

    tmp = out.parent / f".{out.name}.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)  # a crashed earlier export
    tmp.mkdir()
    try:
        tensors = read.load(dtype, chunk_bytes, progress)
        metadata = {"format": "pt", "source": str(checkpoint.resolve()), "weights": weights}
        if step is not None:
            metadata["step"] = str(step)
        _save(tmp / EMA_WEIGHTS, tensors, metadata)
        del tensors
        _check_written(tmp / EMA_WEIGHTS, expected)
        for name in (LLM_CONFIG, VIT_CONFIG, EXTRA_CONFIG):
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        link_or_copy(source_dir / VAE_WEIGHTS, tmp / VAE_WEIGHTS)
        _write_tokenizer(source_dir, tmp)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_checkpoint(checkpoint: str | Path) -> int:
    """Check that a step directory would load (marker, DCP metadata, configs, VAE, the model's and the
    EMA's key sets and shapes) without reading any tensor; returns the number of model tensors."""
    checkpoint = Path(checkpoint)
    _check_training_layout(checkpoint)
    cfg = _read_source_config(checkpoint)
    expected = _expected(cfg)
    _check_vae(checkpoint, cfg)
    lora = _lora_of(checkpoint)
    for weights in ("model", "ema"):
        if lora.enabled:
            _LoraDcpWeights(checkpoint, weights, expected, lora)
        else:
            _DcpWeights(checkpoint, weights, expected)
    return len(expected)


# ----------------------------------------------------------------------------------------- checks


def _require_marker(checkpoint: Path) -> None:
    latest = latest_checkpoint(checkpoint)
    if not (checkpoint / MARKER).is_file() and latest is not None:
        raise ConfigError(
            f"{checkpoint} is a checkpoint root, not a step directory: pass one of its complete step "
            f"directories, e.g. the latest, {latest}"
        )
    if not (checkpoint / MARKER).is_file():
        raise ConfigError(
            f"{checkpoint} is not a complete checkpoint (no {MARKER} marker; the save was interrupted or is "
            f"still running): export a step directory that has {checkpoint / MARKER}, e.g. the latest complete "
            f"one in {checkpoint.parent}"
        )


def _check_training_layout(checkpoint: Path) -> None:
    has_upstream_weights = any((checkpoint / n).is_file() for n in (EMA_WEIGHTS, MODEL_WEIGHTS))
    if not (checkpoint / MARKER).is_file() and not (checkpoint / DCP_METADATA).is_file() and has_upstream_weights:
        raise ConfigError(
            f"{checkpoint} looks like an upstream checkpoint folder (safetensors weights, no {MARKER} marker, "
            f"no DCP {DCP_METADATA}): pass config_from / --config-from MODEL_DIR, a directory with "
            f"{LLM_CONFIG}, {VIT_CONFIG}, {VAE_WEIGHTS} and the tokenizer (e.g. the released BAGEL-7B-MoT)"
        )
    _require_marker(checkpoint)
    if not (checkpoint / DCP_METADATA).is_file():
        raise ConfigError(
            f"{checkpoint / DCP_METADATA} not found: {checkpoint} is not a torch.distributed.checkpoint step "
            f"directory. For a folder of safetensors weights (upstream layout) pass config_from / "
            f"--config-from MODEL_DIR with the configs, {VAE_WEIGHTS} and tokenizer"
        )
    missing = [n for n in (LLM_CONFIG, VIT_CONFIG, VAE_WEIGHTS) if not (checkpoint / n).is_file()]
    if missing:
        raise ConfigError(
            f"{checkpoint} lacks {', '.join(missing)} (a complete training checkpoint holds the configs and "
            f"the VAE): pass config_from / --config-from MODEL_DIR with the run's configs and {VAE_WEIGHTS} "
            f"(e.g. the model directory training started from)"
        )


def _check_out(out: Path, checkpoint: Path, source_dir: Path, overwrite: bool) -> None:
    resolved = out.resolve()
    if resolved in (checkpoint.resolve(), source_dir.resolve()):
        raise ConfigError(f"--out {out} is the checkpoint / config directory itself: choose a new directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory: choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty: choose a new directory or pass --overwrite")


def _read_source_config(source_dir: Path) -> BagelConfig:
    if not source_dir.is_dir():
        raise ConfigError(f"config directory {source_dir} does not exist (give a model directory with the configs)")
    if not (source_dir / VAE_WEIGHTS).is_file():
        raise ConfigError(
            f"{source_dir / VAE_WEIGHTS} not found: the export needs the FLUX VAE the model was trained with "
            "(copy ae.safetensors from the released BAGEL directory, or pass --config-from MODEL_DIR)"
        )
    return read_config(source_dir)


def _expected(cfg: BagelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Keys, shapes and dtypes of ``Bagel.state_dict()`` for ``cfg`` (built on meta: nothing allocated)."""
    model = build_model(cfg, "meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _compare(
    where: str, config_dir: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> None:
    """Strict key/shape comparison (``check_keys``) with the export's fix and the table-size hint."""
    hint = ""
    if "latent_pos_embed.pos_embed" in found and found["latent_pos_embed.pos_embed"] != expected.get(
        "latent_pos_embed.pos_embed"
    ):
        hint = (
            " latent_pos_embed rows = max_latent_size**2: set max_latent_size in "
            f"{config_dir / EXTRA_CONFIG} to the value the run trained with."
        )
    fix = (
        "Check that the configs belong to this checkpoint (same preset / layer_module / visual_gen, "
        "visual_und) or pass --config-from with the run's configs." + hint
    )
    check_keys(where, expected, found, "BAGEL model", config_dir, fix)


def _check_vae(source_dir: Path, cfg: BagelConfig) -> None:
    with torch.device("meta"):
        vae = AutoEncoder(cfg.vae)
    path = source_dir / VAE_WEIGHTS
    fix = "Copy ae.safetensors from the released BAGEL directory."
    check_keys(path, expected_shapes(vae), header_shapes(path), "FLUX autoencoder", source_dir, fix)


def _check_written(path: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    _compare(str(path), path.parent, {k: s for k, (s, _) in expected.items()}, header_shapes(path))


def _step_of(checkpoint: Path) -> int | None:
    """``train_state.json``'s step, else the folder name (``step_1000`` / upstream ``0001000``)."""
    state = checkpoint / TRAIN_STATE
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{state}: unreadable training state ({exc}); it must hold {{'step': N}}") from exc
    m = _STEP_NAME.match(checkpoint.resolve().name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------- readers


def _chunks(sizes: list[tuple[str, int]], chunk_bytes: int) -> list[list[str]]:
    """Consecutive groups of keys of at most ``chunk_bytes`` each (a larger tensor is a chunk alone)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    total = 0
    for key, nbytes in sizes:
        if current and total + nbytes > chunk_bytes:
            chunks.append(current)
            current, total = [], 0
        current.append(key)
        total += nbytes
    if current:
        chunks.append(current)
    return chunks


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()


class _DcpWeights:
    """One sub-state (``"ema"`` or ``"model"``) of a DCP checkpoint, read single-process in chunks."""

    def __init__(self, path: Path, weights: Weights, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self.weights = weights
        check_checkpoint_files(path)  # before torch unpickles .metadata without restriction
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # a truncated / foreign .metadata: pickle or attribute errors
            raise ConfigError(
                f"{path / DCP_METADATA}: unreadable torch.distributed.checkpoint metadata ({exc}); "
                "export another complete step"
            ) from exc
        prefix = weights + "."
        entries = {k[len(prefix) :]: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}
        if not entries:
            tops = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata})
            raise ConfigError(
                f"{path}: the DCP checkpoint holds no {weights!r} state (top-level entries: {', '.join(tops)}); "
                f"use --weights {'model' if weights == 'ema' else 'ema'} or export a checkpoint saved with it"
            )
        not_tensors = sorted(k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata))
        if not_tensors:
            raise ConfigError(f"{path}: {weights!r} entries that are not tensors: {key_listing(not_tensors)}")
        found = {k: tuple(v.size) for k, v in entries.items()}
        _compare(f"{path} ({weights!r} weights)", path, {k: s for k, (s, _) in expected.items()}, found)
        self.stored = {k: entries[k].properties.dtype for k in expected}
        self.expected = expected

    def load(self, dtype: torch.dtype, chunk_bytes: int, progress: Progress | None) -> dict[str, torch.Tensor]:

        sizes = [(k, _numel(shape) * self.stored[k].itemsize) for k, (shape, _) in self.expected.items()]
        total = sum(n for _, n in sizes)
        nbytes = dict(sizes)
        done = 0
        result: dict[str, torch.Tensor] = {}
        for keys in _chunks(sizes, chunk_bytes):
            chunk = {k: torch.empty(self.expected[k][0], dtype=self.stored[k]) for k in keys}
            state = {self.weights: chunk}
            _read_dcp(self.path, state, f"the {self.weights!r} tensors")
            for k in keys:
                result[k] = _cast(state[self.weights][k], dtype)
            del state, chunk
            done += sum(nbytes[k] for k in keys)
            if progress is not None:
                progress(done, total)
        return result


class _SafetensorsWeights:
    """``model.safetensors`` / ``ema.safetensors`` of an upstream folder, read one tensor at a time."""

    def __init__(self, path: Path, weights: Weights, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.file = path / (EMA_WEIGHTS if weights == "ema" else MODEL_WEIGHTS)
        if not self.file.is_file():
            present = [n for n in (EMA_WEIGHTS, MODEL_WEIGHTS) if (path / n).is_file()]
            other = "model" if weights == "ema" else "ema"
            fix = f"use --weights {other}" if present else "give a checkpoint folder with safetensors weights"
            raise ConfigError(
                f"{self.file} not found (present: {', '.join(present) or 'no weights, no DCP .metadata'}): {fix}"
            )
        self.expected = expected
        _compare(str(self.file), path, {k: s for k, (s, _) in expected.items()}, header_shapes(self.file))

    def load(self, dtype: torch.dtype, chunk_bytes: int, progress: Progress | None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        result: dict[str, torch.Tensor] = {}
        total = self.file.stat().st_size
        done = 0
        with safe_open(str(self.file), framework="pt") as f:
            for key in self.expected:
                t = f.get_tensor(key)
                done += t.numel() * t.element_size()
                result[key] = _cast(t, dtype)
                del t
                if progress is not None and (done >= total or len(result) % 64 == 0):
                    progress(min(done, total), total)
        if progress is not None:
            progress(total, total)
        return result


def _dcp_entries(path: Path) -> dict:
    """DCP metadata entries of a step directory (checked before torch unpickles it)."""
    from torch.distributed.checkpoint import FileSystemReader

    check_checkpoint_files(path)
    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # a truncated / foreign .metadata: pickle or attribute errors
        raise ConfigError(
            f"{path / DCP_METADATA}: unreadable torch.distributed.checkpoint metadata ({exc}); "
            "export another complete step"
        ) from exc


def _lora_of(checkpoint: Path) -> LoRA:
    """The LoRA settings of a DCP step directory: adapters in its metadata and the run's ``--lora_*`` arguments in
    ``train_state.json`` (both or neither)."""
    lora = saved_lora(checkpoint)
    if not (checkpoint / DCP_METADATA).is_file():
        return lora
    has_adapters = any(k.startswith("model.") and is_adapter_key(k) for k in _dcp_entries(checkpoint))
    if has_adapters != lora.enabled:
        raise ConfigError(
            f"{checkpoint}: its DCP files {'hold' if has_adapters else 'hold no'} LoRA adapters but {TRAIN_STATE} "
            f"says {'no --lora_rank' if not lora.enabled else lora.describe()}; the folder is inconsistent: export "
            "another step"
        )
    return lora


class _LoraDcpWeights:
    """The merged weights of a LoRA step directory, read single-process in chunks: the frozen base from ``model``
    (the ``ema`` entry of a LoRA run holds the adapters only; the base never changes) and the adapters from
    ``weights``; released keys out."""

    def __init__(
        self, path: Path, weights: Weights, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], lora: LoRA
    ):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, self.weights, self.expected, self.lora = path, weights, expected, lora
        entries = _dcp_entries(path)
        wrapped = {
            k[len("model.") : -len(f".lora_A.{ADAPTER}.weight")]
            for k in entries
            if k.startswith("model.") and k.endswith(f".lora_A.{ADAPTER}.weight")
        }
        self.adapters = sorted(wrapped)
        self.sources: dict[str, list[tuple[str, str]]] = {}
        for key in expected:
            module, _, leaf = key.rpartition(".")
            if module in wrapped and leaf == "weight":
                self.sources[key] = [
                    ("model", f"{module}.base_layer.weight"),
                    (weights, f"{module}.lora_A.{ADAPTER}.weight"),
                    (weights, f"{module}.lora_B.{ADAPTER}.weight"),
                ]
            elif module in wrapped:
                self.sources[key] = [("model", f"{module}.base_layer.{leaf}")]
            else:
                self.sources[key] = [("model", key)]
        needed = {f"{top}.{name}" for srcs in self.sources.values() for top, name in srcs}
        missing = sorted(needed - set(entries))
        if missing:
            raise ConfigError(
                f"{path}: a LoRA checkpoint without {key_listing(missing)} ({weights!r} weights); the folder does not "
                "belong to these configs or is damaged: export another step"
            )
        not_tensors = sorted(k for k in needed if not isinstance(entries[k], TensorStorageMetadata))
        if not_tensors:
            raise ConfigError(f"{path}: entries that are not tensors: {key_listing(not_tensors)}")
        found = {k: tuple(entries[f"{srcs[0][0]}.{srcs[0][1]}"].size) for k, srcs in self.sources.items()}
        _compare(f"{path} ({weights!r} weights, LoRA)", path, {k: s for k, (s, _) in expected.items()}, found)
        for module in self.adapters:
            a = tuple(entries[f"{weights}.{module}.lora_A.{ADAPTER}.weight"].size)
            b = tuple(entries[f"{weights}.{module}.lora_B.{ADAPTER}.weight"].size)
            out_f, in_f = found[f"{module}.weight"]
            if a != (lora.rank, in_f) or b != (out_f, lora.rank):
                raise ConfigError(
                    f"{path}: adapter {module} has shapes {a}, {b}, not rank {lora.rank} of {(out_f, in_f)} as "
                    f"{TRAIN_STATE} says; the folder is inconsistent: export another step"
                )
        self.stored = {name: entries[name].properties.dtype for name in needed}
        self.shapes = {name: tuple(entries[name].size) for name in needed}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{"top.key": tensor}`` for the given DCP names (one ``dcp.load``)."""

        state: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            top, _, key = name.partition(".")
            state.setdefault(top, {})[key] = torch.empty(self.shapes[name], dtype=self.stored[name])
        _read_dcp(self.path, state, "the LoRA checkpoint's tensors")
        return {f"{top}.{key}": v for top, d in state.items() for key, v in d.items()}

    def load(self, dtype: torch.dtype, chunk_bytes: int, progress: Progress | None) -> dict[str, torch.Tensor]:
        def nbytes(key: str) -> int:
            return sum(_numel(self.shapes[f"{t}.{n}"]) * self.stored[f"{t}.{n}"].itemsize for t, n in self.sources[key])

        sizes = [(k, nbytes(k)) for k in self.expected]
        total = sum(n for _, n in sizes)
        done = 0
        result: dict[str, torch.Tensor] = {}
        for keys in _chunks(sizes, chunk_bytes):
            read = self._read(sorted({f"{t}.{n}" for k in keys for t, n in self.sources[k]}))
            for k in keys:
                srcs = [read[f"{t}.{n}"] for t, n in self.sources[k]]
                value = merge(srcs[0], srcs[1], srcs[2], self.lora.scaling) if len(srcs) == 3 else srcs[0]
                result[k] = _cast(value, dtype)
            del read
            chunk = set(keys)
            done += sum(n for k, n in sizes if k in chunk)
            if progress is not None:
                progress(done, total)
        return result

    def adapter_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The adapters of ``weights`` under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
        names = [f"{self.weights}.{m}.{ab}.{ADAPTER}.weight" for m in self.adapters for ab in ("lora_A", "lora_B")]
        read = self._read(names)
        return {
            adapter_file_key(m, ab): _cast(read[f"{self.weights}.{m}.{ab}.{ADAPTER}.weight"], dtype)
            for m in self.adapters
            for ab in ("lora_A", "lora_B")
        }


def _export_adapter(
    checkpoint: Path,
    out: Path,
    weights: Weights,
    dtype: torch.dtype,
    lora: LoRA,
    source_dir: Path,
    step: int | None,
    overwrite: bool,
) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (peft's format) of a LoRA step directory."""
    cfg = _read_source_config(source_dir)
    read = _LoraDcpWeights(checkpoint, weights, _expected(cfg), lora)
    config = lora.peft_config()
    config.base_model_name_or_path = _base_model_of(checkpoint)
    tmp = out.parent / f".{out.name}.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        metadata = {"format": "pt", "source": str(checkpoint.resolve()), "weights": weights}
        if step is not None:
            metadata["step"] = str(step)
        _save(tmp / ADAPTER_WEIGHTS, read.adapter_tensors(dtype), metadata)
        config.save_pretrained(str(tmp))
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _base_model_of(checkpoint: Path) -> str | None:
    """The model directory the LoRA run started from (``--model_path``), when the checkpoint's config names one
    that exists here: where the adapter's base weights live in the released layout."""
    try:
        model_path = json.loads((checkpoint / TRAIN_STATE).read_text())["config"]["model"]["model_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(model_path)
    return str(path.resolve()) if (path / LLM_CONFIG).is_file() else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_dcp(path: Path, state: dict[str, dict[str, torch.Tensor]], what: str) -> None:
    """``dcp.load`` of ``state`` (filled in place) from a step folder without a process group; any failure is a
    ConfigError naming the folder and ``what`` was read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    except (CheckpointException, Exception) as exc:  # a BaseException wrapping per-rank errors
        raise ConfigError(
            f"{path}: reading {what} failed ({_short(exc)}); the checkpoint is damaged or incomplete "
            "(are all __<rank>_<i>.distcp files present?): export another step"
        ) from exc


def _short(exc: BaseException) -> str:
    """One line: DCP's CheckpointException carries ``{rank: (exception, traceback)}``; show the exceptions."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        text = "; ".join(f"{type(e).__name__}: {e}" for e in inner)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + " ..."


# ----------------------------------------------------------------------------------------- writing


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _write_tokenizer(source_dir: Path, out: Path) -> None:
    """Copy the source's tokenizer files, else save the bundled Qwen2.5 tokenizer (self-contained output)."""
    if has_tokenizer_files(source_dir):
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, out / name)
        return
    from bagel_core.data.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(None)
    tokenizer.save_pretrained(str(out))


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # appeared while we were exporting
            raise ConfigError(f"--out {out} exists and is not empty: choose a new directory or pass --overwrite")
        old = out.parent / f".{out.name}.old.{os.getpid()}.{int(time.time())}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
