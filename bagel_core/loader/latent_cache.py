"""The VAE latent cache: every VAE image's posterior moments, encoded once by the frozen VAE.

Why: with ``freeze_vae`` the VAE never changes, yet upstream encodes every image again in every
training step (on CPU the encode costs about twice the model's own forward and backward). Here each
image the training can use as a VAE image is encoded once, under its group's image transform, and
its posterior *moments* (mean and log-variance) are stored, not a latent: the training step still
draws the posterior sample itself, with the same generator, so a step on cached moments gives the
loss a live encode gives.

Layout of a cache folder::

    latents.json                    the manifest (below), rewritten atomically after every shard
    shards/<name>.safetensors       one per (group, source file): tensors "<row_group>/<row_index>/<image>",
                                    each [2 z, H/8, W/8] in the VAE's dtype

The manifest records the VAE (a hash of its weights, its dtype and latent constants), each group's
transform settings and, per shard, its source file with the size and mtime it had when encoded. A
shard is written under a temporary name, renamed, and only then listed, so a killed build resumes
at the first shard not listed; a source file changed since is re-encoded. The trainer opens a cache
only when the VAE and every transform match (:func:`open_latent_cache`); a shard whose file changed
is left out, and any image without moments is encoded live (:func:`pack_latents`).

Equivalence: the live path encodes each image alone at its own size (not in a zero-padded batch as
upstream, whose GroupNorm statistics then depend on the other images of the pack; single-image and
same-size packs are unchanged) and draws each image's noise in pack order from the step's generator;
the cached path draws the same noise on the same moments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_core.config.dataset_config import DatasetConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.data.transforms import ImageTransform
from bagel_core.loader.readers import COLUMNS, decode_image
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.sequence.tokens import SampleRejected
from bagel_core.stats.token_stats import load_index

log = logging.getLogger(__name__)

MANIFEST = "latents.json"
SHARDS = "shards"
FORMAT = 1
#: Pixels per latent element of the FLUX VAE (its encoder downsamples by 8).
VAE_STRIDE = 8


# ---- the VAE and the transforms a cache was made with ---------------------------------------------
def vae_identity(vae: AutoEncoder) -> dict[str, Any]:
    """What a cache must agree with: a sha256 over the VAE's weights (names, dtypes, shapes, bytes), its
    dtype and latent constants. Weights, not the file, so an exported ``ae.safetensors`` matches its source."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # flattened in logical order: the same bytes whatever the memory format (channels-last convolutions)
        digest.update(t.contiguous().flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    cfg = vae.cfg
    return {
        "sha256": digest.hexdigest(),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "z_channels": cfg.z_channels,
        "scale_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor,
    }


def vae_transforms(dataset_config: DatasetConfig) -> dict[str, dict[str, Any]]:
    """Each generation group's VAE image transform settings (JSON-ready); VLM groups have no VAE images."""
    out = {}
    for g in dataset_config.groups.values():
        if g.task != "vlm" and g.image_transform_args is not None:
            out[g.group] = json.loads(json.dumps(dataclasses.asdict(g.image_transform_args)))
    return out


def file_identity(path: str | Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def shard_name(group: str, source_file: str) -> str:
    return hashlib.sha256(f"{group}|{os.path.realpath(source_file)}".encode()).hexdigest()[:24]


def image_key(row_group: int, row_index: int, image_index: int) -> str:
    return f"{row_group}/{row_index}/{image_index}"


# ---- encoding and sampling ------------------------------------------------------------------------
def encode_moments(vae: AutoEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """One image [3, H, W] in [-1, 1] -> its moments [2 z, H/8, W/8], encoded alone at its own size."""
    with torch.no_grad():
        device = next(vae.parameters()).device
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as build_vae
        return vae.moments(pixels.unsqueeze(0).to(device, memory_format=layout))[0]


def pack_latents(
    vae: AutoEncoder,
    shapes: list[tuple[int, int]],
    generator: torch.Generator,
    patch: int,
    padded_images: torch.Tensor | None = None,
    padded_moments: torch.Tensor | None = None,
    from_cache: list[bool] | None = None,
) -> torch.Tensor:
    """A pack's ``padded_latent`` [N, z, h, w] (float32): image ``i`` of ``shapes`` (latent patches per side,
    ``patch`` latent elements each) comes from the next cached moments when ``from_cache[i]``, else from
    the next live image, encoded alone; its posterior noise is drawn from ``generator`` in pack order."""
    flags = from_cache if from_cache is not None else [False] * len(shapes)
    if len(flags) != len(shapes):
        raise DataError(f"pack has {len(shapes)} VAE images but {len(flags)} cache flags")
    device = generator.device
    h = max(r for r, _ in shapes) * patch
    w = max(c for _, c in shapes) * patch
    out = torch.zeros(len(shapes), vae.cfg.z_channels, h, w, dtype=torch.float32, device=device)
    live = cached = 0
    down = vae.cfg.downsample
    for i, ((rows, cols), is_cached) in enumerate(zip(shapes, flags)):
        lh, lw = rows * patch, cols * patch
        if is_cached:
            assert padded_moments is not None
            moments = padded_moments[cached, :, :lh, :lw].to(device, vae.dtype)
            cached += 1
        else:
            assert padded_images is not None
            moments = encode_moments(vae, padded_images[live, :, : lh * down, : lw * down])
            live += 1
        with torch.no_grad():
            out[i, :, :lh, :lw] = vae.sample_latent(moments.unsqueeze(0), generator)[0].float()
    return out


# ---- the manifest ---------------------------------------------------------------------------------
@dataclass
class CacheManifest:
    vae: dict[str, Any]
    transforms: dict[str, dict[str, Any]]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = FORMAT
    coverage: dict[str, Any] = field(default_factory=dict)  # what the last build was asked for (build_latent_cache)

    @classmethod
    def read(cls, folder: str | Path) -> CacheManifest | None:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(
                raw["vae"], raw["transforms"], raw.get("shards", {}), raw.get("format", 0), raw.get("coverage", {})
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a latent cache manifest ({exc}); delete the folder and rebuild it") from exc

    def write(self, folder: str | Path) -> None:
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, path)

    def mismatch(self, vae: dict[str, Any], transforms: dict[str, dict[str, Any]]) -> str:
        """Why this cache does not fit a VAE and transforms ('' when it does)."""
        if self.format != FORMAT:
            return f"cache format {self.format}, this version reads format {FORMAT}"
        for key in ("sha256", "dtype", "z_channels", "scale_factor", "shift_factor"):
            if self.vae.get(key) != vae.get(key):
                return f"it was encoded with a VAE whose {key} is {self.vae.get(key)!r}, this run's is {vae.get(key)!r}"
        for group, args in transforms.items():
            if group in self.transforms and self.transforms[group] != args:
                return f"group {group}: encoded with image_transform_args {self.transforms[group]}, this run has {args}"
        return ""


# ---- building -------------------------------------------------------------------------------------
#: A sample as the cache keys it: (group, real path of its source file, row group, row index).
SampleKey = tuple[str, str, int, int]


@dataclass(frozen=True)
class ShardJob:
    group: str
    dataset: str
    task: str
    source_file: str
    rows: tuple[tuple[int, int], ...]  # (row_group, row_index) to encode: the index's ok samples (or those asked for)
    transform: dict[str, Any]
    merge: bool = False  # add to the shard already there (its rows are kept), instead of replacing it


@dataclass
class BuildResult:
    folder: Path
    shards_written: int = 0
    shards_kept: int = 0
    images: int = 0
    samples: int = 0
    rejected: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"latent cache {self.folder}: {self.shards_written} shard(s) encoded ({self.samples} samples, "
            f"{self.images} images), {self.shards_kept} unchanged shard(s) kept, {len(self.rejected)} image(s) "
            f"rejected, {self.seconds:.1f}s"
        )


def plan_shards(index: str | Path, dataset_config: DatasetConfig, only: set[SampleKey] | None = None) -> list[ShardJob]:
    """One job per (generation group, source file) over the index's ok rows (those in ``only``, when given), in a
    stable order."""
    import polars as pl

    rows = load_index(index).filter(pl.col("status") == "ok")
    transforms = vae_transforms(dataset_config)
    jobs = []
    for g in dataset_config.groups.values():
        if g.group not in transforms:
            continue
        mine = rows.filter(pl.col("dataset").is_in(list(g.dataset_names)))
        for (dataset, source_file, task), part in mine.group_by(
            ["dataset", "source_file", "task"], maintain_order=True
        ):
            if task not in COLUMNS:
                raise DataError(f"{source_file}: task {task!r} has no VAE images to cache")
            keys = tuple(zip(part["row_group"].to_list(), part["row_index"].to_list()))
            if only is not None:
                real = os.path.realpath(source_file)
                keys = tuple(k for k in keys if (g.group, real, *k) in only)
            if keys:
                jobs.append(ShardJob(g.group, dataset, task, source_file, keys, transforms[g.group]))
    return jobs


def _row_images(task: str, record: dict[str, Any]) -> list[Any]:
    return [record.get("image")] if task == "t2i" else list(record.get("image_list") or [])


@dataclass
class ShardResult:
    samples: int  # encoded by this job
    images: int
    rejected: list[str]  # one line per image that could not be encoded
    rejected_rows: list[tuple[int, int]]  # (row_group, row_index) with a rejected image: not asked for again


def encode_shard(vae: AutoEncoder, job: ShardJob, out: Path) -> ShardResult:
    """Encode one shard's rows into ``out/shards`` (temp name, then rename; ``job.merge``: beside the moments the
    shard already holds)."""
    from bagel_core.config.image_args import ImageTransformArgs

    args = dict(job.transform)
    args["image_mean"], args["image_std"] = tuple(args["image_mean"]), tuple(args["image_std"])
    transform = ImageTransform.from_args(ImageTransformArgs(**args))
    wanted: dict[int, list[int]] = {}
    for rg, row in job.rows:
        wanted.setdefault(rg, []).append(row)
    target = out / SHARDS / f"{shard_name(job.group, job.source_file)}.safetensors"
    tensors: dict[str, torch.Tensor] = load_file(str(target)) if job.merge else {}
    rejected: list[str] = []
    rejected_rows: list[tuple[int, int]] = []
    parquet = pq.ParquetFile(job.source_file)
    images = 0
    for rg, row_list in sorted(wanted.items()):
        records = parquet.read_row_group(rg, columns=[COLUMNS[job.task][0]], use_threads=False).to_pylist()
        for row in row_list:
            for k, data in enumerate(_row_images(job.task, records[row])):
                try:
                    pixels = transform(decode_image(data, f"image {k}"))
                except SampleRejected as exc:
                    rejected.append(f"{job.source_file} row group {rg} row {row} image {k}: {exc}")
                    rejected_rows.append((rg, row))
                    continue
                tensors[image_key(rg, row, k)] = encode_moments(vae, pixels).cpu().contiguous()
                images += 1
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    meta = {"group": job.group, "dataset": job.dataset, "source_file": job.source_file}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, target)
    return ShardResult(len(job.rows), images, rejected, rejected_rows)


def encoded_rows(shard: Path) -> set[tuple[int, int]]:
    """(row_group, row_index) of every sample a shard holds moments for (read from its header only)."""
    with safe_open(str(shard), framework="pt") as handle:
        names = handle.keys()  # a safetensors handle is not iterable
    return {(int(rg), int(row)) for rg, row, _ in (name.split("/") for name in names)}


_WORKER_VAE: AutoEncoder | None = None


def _encode_in_worker(job: ShardJob, out: Path, threads: int) -> ShardResult:
    torch.set_num_threads(threads)
    assert _WORKER_VAE is not None
    return encode_shard(_WORKER_VAE, job, out)


def build_latent_cache(
    vae: AutoEncoder,
    dataset_config: DatasetConfig,
    index: str | Path,
    out: str | Path,
    workers: int = 1,
    progress: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
    only: set[SampleKey] | None = None,
    coverage: dict[str, Any] | None = None,
) -> BuildResult:
    """Encode the VAE images of the configured generation groups into ``out`` (module docstring): every ok
    sample of the index, or only the samples in ``only`` (e.g. those a planned training reads:
    :func:`bagel_core.train.latents.planned_reads`); ``coverage`` describes that choice in the manifest.

    Incremental and resumable: a shard of an unchanged source file is kept when it already holds every sample
    asked for; one that lacks some gets them added (its moments are kept). ``workers`` > 1 encodes files in
    forked processes (CPU only: the VAE is shared copy-on-write). A cache made with another VAE or other
    transforms is refused: use another folder or delete it.
    """
    started = time.monotonic()
    folder = Path(out)
    (folder / SHARDS).mkdir(parents=True, exist_ok=True)
    for stale in (folder / SHARDS).glob("*.tmp*"):
        stale.unlink()  # a build killed mid-shard
    identity, transforms = vae_identity(vae), vae_transforms(dataset_config)
    manifest = CacheManifest.read(folder)
    if manifest is None:
        manifest = CacheManifest(identity, transforms)
    else:
        why = manifest.mismatch(identity, transforms)
        if why:
            raise ConfigError(f"{folder} already holds a latent cache that does not fit: {why}; use another --out")
        manifest.transforms.update(transforms)
    manifest.coverage = coverage or {"scope": "all" if only is None else "samples", "samples": len(only or ())}
    result = BuildResult(folder)
    todo = []
    for job in plan_shards(index, dataset_config, only):
        name = shard_name(job.group, job.source_file)
        current = file_identity(job.source_file)
        missing = _missing_rows(folder, manifest.shards.get(name), job, current)
        if missing is None:
            manifest.shards.pop(name, None)  # none usable: (re-)encoded whole
        elif not missing:
            if only is None:
                manifest.shards[name]["complete"] = True  # it turned out to hold every ok sample already
            result.shards_kept += 1
            continue
        else:
            job = dataclasses.replace(job, rows=missing, merge=True)
        todo.append((name, job, current))
    manifest.write(folder)
    bar = _progress(len(todo), progress)

    def finished(name: str, job: ShardJob, current: dict[str, int], done: ShardResult) -> None:
        before = manifest.shards.get(name) if job.merge else None
        manifest.shards[name] = {
            "group": job.group,
            "dataset": job.dataset,
            "source_file": job.source_file,
            "samples": done.samples + (before["samples"] if before else 0),
            "images": done.images + (before["images"] if before else 0),
            "rejected_rows": sorted(
                {*map(tuple, before.get("rejected_rows", []) if before else []), *done.rejected_rows}
            ),
            "complete": only is None or bool(before and before.get("complete")),  # every ok sample of the file
            **current,
        }
        manifest.write(folder)
        result.shards_written += 1
        result.samples += done.samples
        result.images += done.images
        result.rejected += done.rejected
        if bar is not None:
            bar.update(1)
        if on_shard is not None:
            on_shard(result.shards_written, len(todo))

    on_cpu = next(vae.parameters()).device.type == "cpu"
    if workers > 1 and on_cpu and len(todo) > 1:
        global _WORKER_VAE
        _WORKER_VAE = vae
        threads = max(1, torch.get_num_threads() // workers)
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_encode_in_worker, job, folder, threads): (n, job, c) for n, job, c in todo}
                for future in as_completed(futures):
                    finished(*futures[future], future.result())
        finally:
            _WORKER_VAE = None
    else:
        for name, job, current in todo:
            finished(name, job, current, encode_shard(vae, job, folder))
    if bar is not None:
        bar.close()
    result.seconds = time.monotonic() - started
    return result


def _missing_rows(
    folder: Path, entry: dict[str, Any] | None, job: ShardJob, current: dict[str, int]
) -> tuple[tuple[int, int], ...] | None:
    """The job's rows its listed shard lacks (``()``: it has them all), or None when there is no usable shard
    (not listed, file gone, or its source file changed since)."""
    shard = folder / SHARDS / f"{shard_name(job.group, job.source_file)}.safetensors"
    if entry is None or not shard.is_file() or any(entry.get(k) != v for k, v in current.items()):
        return None
    if entry.get("complete"):
        return ()
    have = encoded_rows(shard) | {tuple(r) for r in entry.get("rejected_rows", [])}
    return tuple(r for r in job.rows if r not in have)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="VAE latents")


# ---- reading (the training loader) ----------------------------------------------------------------
class LatentCache:
    """Read side: moments by (group, source file, row group, row, image); shards open lazily per process."""

    def __init__(self, folder: str | Path, shards: dict[tuple[str, str], str]) -> None:
        self.folder = Path(folder)
        self.shards = shards  # (group, realpath of source file) -> shard name
        self._open: dict[str, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "shards": self.shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["shards"])

    def _shard(self, group: str, source_file: str) -> tuple[Any, set[str]] | None:
        """The open shard of (group, file) and its keys (opened once per process), or None when not cached."""
        name = self.shards.get((group, os.path.realpath(source_file)))
        if name is None:
            return None
        if self._pid != os.getpid():  # forked DataLoader worker: its own handles
            self._open, self._pid = {}, os.getpid()
        opened = self._open.get(name)
        if opened is None:
            handle = safe_open(str(self.folder / SHARDS / f"{name}.safetensors"), framework="pt")
            opened = self._open[name] = (handle, set(handle.keys()))
        return opened

    def holds(self, group: str, source_file: str, row_group: int, row_index: int, image_index: int) -> bool:
        """Whether the cache has that image's moments (nothing is read but the shard's header)."""
        opened = self._shard(group, source_file)
        return opened is not None and image_key(row_group, row_index, image_index) in opened[1]

    def lookup(
        self, group: str, source_file: str, row_group: int, row_index: int, image_index: int
    ) -> torch.Tensor | None:
        opened = self._shard(group, source_file)
        key = image_key(row_group, row_index, image_index)
        if opened is None or key not in opened[1]:
            return None
        return opened[0].get_tensor(key)


def open_latent_cache(
    folder: str | Path, vae: dict[str, Any], transforms: dict[str, dict[str, Any]], groups: Iterable[str]
) -> tuple[LatentCache | None, str]:
    """The cache at ``folder`` if it fits this VAE and these transforms, with a line saying what is used;
    else ``(None, why)``. Shards whose source file changed since encoding are left out (counted)."""
    manifest = CacheManifest.read(folder)
    if manifest is None:
        return None, f"{folder}: no latent cache ({MANIFEST} missing); build it with `bagel data latents`"
    why = manifest.mismatch(vae, transforms)
    if why:
        return None, f"{folder}: latent cache refused: {why}; rebuild it with `bagel data latents`"
    wanted = set(groups)
    shards: dict[tuple[str, str], str] = {}
    changed = missing = 0
    for name, entry in manifest.shards.items():
        if entry["group"] not in wanted:
            continue
        path = entry["source_file"]
        try:
            same = all(entry.get(k) == v for k, v in file_identity(path).items())
        except OSError:
            same = False
        if not same:
            changed += 1
            continue
        if not (Path(folder) / SHARDS / f"{name}.safetensors").is_file():
            missing += 1
            continue
        shards[(entry["group"], os.path.realpath(path))] = name
    note = f"latent cache {folder}: {len(shards)} shard(s) used"
    if changed or missing:
        note += f"; {changed} left out (source file changed since encoding), {missing} missing (encoded live)"
    return LatentCache(folder, shards), note
