"""The packed training dataset: manifest units -> samples -> plans -> packed batches (data-format.md 7-13).

One :class:`PackedDataset` per rank (a ``torch.utils.data.IterableDataset``); each DataLoader worker
reads its own units from the sampling manifest (:func:`bagel_core.plan.manifest.read_manifest`, the
same split ``bagel data plan`` shows) and runs its own packer. Per worker and group a
:class:`~bagel_core.loader.readers.UnitStream` reads the units in order forever (logging the
``<group> repeat in rank-r worker-w`` line after each pass); samples are decoded (parquet row groups
with pyarrow, JSONL lines + image files), planned with the shared builders of
:mod:`bagel_core.data.tokens` (``sample_t2i_plan``/``sample_edit_plan``/``build_vlm_plan``), costed
with :func:`~bagel_core.sequence.tokens.count_tokens` (the one token accounting: the packer's real length
*is* ``count_tokens(plan, dropped).total``, checked against the tensors built), and packed by
:func:`~bagel_core.plan.packing.pack_events` (upstream's loop, data-format.md 8.2).

Each yielded batch is the dict of data-format.md 11 (see :class:`PackBuilder`): ``sequence_length``,
``sample_lens``, ``packed_text_ids``/``_indexes``, ``packed_position_ids``, ``split_lens`` +
``attn_modes`` (always; plus ``nested_attention_masks`` with ``nested_masks=True``), and when
present the VAE (``padded_images`` ... ``mse_loss_indexes``), ViT (``packed_vit_tokens`` ...
``vit_token_seqlens``) and CE (``packed_label_ids``, ``ce_loss_indexes``, ``ce_loss_weights``)
fields, ``batch_data_indexes``, plus ``data_state`` (below) which is *not* a model input:
:meth:`PackedDataset.record` pops it. ``batch_data_indexes`` entries carry upstream's
``{data_indexes, worker_id, dataset_name}`` plus the sample's index key (``dataset``,
``source_file``, ``row_group``, ``row_index``) and its ``num_tokens``/``est_tokens``/``dropped``.

Packing mode (``params.mode``, the trainer's ``--packing``): ``carry`` (default) carries a sample that
does not fit into the next pack, ``upstream`` discards it as upstream does (8.2 step 4); see
:mod:`bagel_core.plan.packing`.

Speed (issue #13.4, ``bench/loader.py``; every output value unchanged, pinned by
``tests/test_loader_pack_digests.py``): a worker's time goes to the bicubic resize, handing the pack's
large tensors to the main process through shared memory, and PNG/JPEG decoding. Images are therefore
resized when added and their bytes written once by :meth:`PackBuilder.finish`, straight into the pack's
padded / patchified tensors (no per-image tensor, patchify or padding copy), allocated in shared memory
inside a DataLoader worker so the pickler does not copy them again. With ``pixels_as_bytes`` (the
trainer's setting) they stay bytes: ``padded_pixels`` [N, 3, H, W] and ``packed_vit_pixels`` [n, p*p*3]
uint8, with ``padded_pixel_sizes``, and per image an index into ``pixel_norms`` (its transform's mean and
std); :func:`normalise_pixels` turns them into ``padded_images`` / ``packed_vit_tokens`` on the consumer's
device (:func:`~bagel_core.data.transforms.normalise_bytes`), bit-identical to normalising in the worker,
which is what the default (float32 packs) does.

Bad samples are never silent: read failures (unreadable file / row group), decode failures and plan
rejections (:class:`~bagel_core.sequence.tokens.SampleRejected`) are skipped, logged and counted per group
and reason, as are over-cap skips, samples that fit beside no pack's mandatory samples (``carry``),
buffered and carried samples and samples discarded by an overflow flush (``upstream``). Samples the
index quarantined (the manifest's ``quarantine.parquet``, written by ``bagel data plan --index``, or
``quarantine=`` an index) are passed over without being read or decoded, counted per group and index
reason under ``quarantined``. ``MAX_EMPTY_PASSES`` consecutive passes over a group's units without
one usable sample raise :class:`DataError` instead of spinning forever.

Reproducible resume (design)
----------------------------
Upstream's resume (13) stores only the last *trained* cursor per group and worker, loses samples
that sat in the overflow buffer or were prefetched, and replays the initial random stream. Here all
randomness is a function of explicit seeds and counters, and the whole packer state is saved at pack
boundaries, so a resumed run yields exactly the packs of an uninterrupted one:

* **Per-sample randomness** (caption/edit-span choice, CFG dropout, timesteps) comes from RNGs
  seeded by ``(seed, rank, logical worker, group, visit)`` where ``visit`` is the group stream's
  read counter (:func:`~bagel_core.loader.readers.plan_rng`). A sample is therefore fully described by
  ``(group, position, visit)`` and can be rebuilt bit-exactly.
* **Packer randomness** (group draws) is one ``random.Random`` per worker; its state is saved.
* **Packer state at a flush**: the fill counter is 0, so the only state is the overflow buffer,
  passed to ``pack_events`` as a caller-owned deque and saved as sample references; on resume the
  samples are re-read and rebuilt, then a fresh ``pack_events`` continues exactly where the old one
  stood (it too starts each pack with the mandatory fill).
* **Worker state travels with the data**: every batch carries ``data_state``, its worker's state
  *after* that batch: stream positions (next record), pass and read counters, the upstream-shaped
  ``data_status`` ``{group: {worker_id: cursor}}`` of the last record read, the packer RNG state, the
  buffer references and the skip counters. The training loop calls :meth:`PackedDataset.record` on
  every batch it trains on (prefetched but untrained batches are thus never counted as consumed) and
  saves :meth:`PackedDataset.state_dict` = ``{workers: {w: latest state}, next_worker, data_status, ...}``.
  Without DataLoader workers, iterating the dataset records automatically.
* **Worker rotation**: a DataLoader takes batches from its workers round-robin starting at worker 0.
  The saved ``next_worker`` k makes physical worker p of the resumed DataLoader play logical worker
  ``(p + k) % num_workers`` (units, seeds and state), so the resumed order continues exactly even when
  the checkpoint was taken in the middle of a round.
* The state is only valid for the same seed, rank, world size, ``num_workers``, packing mode and
  manifest (each stream stores a digest of its unit list); a mismatch raises :class:`ConfigError`
  (a state without a mode was saved before ``carry`` existed: it is ``upstream``). In ``carry`` mode
  a sample carried out of the last pack sits at the front of the saved buffer, so it resumes too.
  A group with ``resume_data_status: false`` restarts its units from the beginning (logged;
  exactness is then given up by request).

The state holds only ints, strings, lists and dicts (``torch.save``/``json`` both work).

Usage in a training loop::

    ds = PackedDataset(config, registry, manifest_dir, rank, world_size, num_workers, params, seed=seed)
    if resuming:
        ds.load_state_dict(saved["data"])
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=collate_packed,
                        pin_memory=True)  # a fresh (non-persistent) loader after load_state_dict
    for batch in loader:
        batch = ds.record(batch)          # consumed: its worker state becomes the latest
        latent = vae.encode(batch.pop("padded_images"))  # when present
        terms = model(**batch, padded_latent=latent)
        ...
        save({"data": ds.state_dict(), ...})  # data_state of every worker as of its last trained batch

Persistent DataLoader workers iterated again continue their own streams (no replay), but only a
fresh loader after :meth:`PackedDataset.load_state_dict` is exact.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from bagel_core.config.dataset_config import DatasetConfig, GroupConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer, special_token_ids
from bagel_core.data.transforms import ImageTransform, normalise_bytes
from bagel_core.loader.latent_cache import VAE_STRIDE, LatentCache
from bagel_core.loader.readers import (
    LoadedSample,
    ReadFailure,
    UnitStream,
    decode_sample,
    make_ids_of,
    plan_rng,
)
from bagel_core.plan.manifest import read_manifest, read_manifest_meta, read_manifest_quarantine
from bagel_core.plan.packing import (
    UPSTREAM,
    Buffered,
    CfgDropout,
    Flush,
    Packed,
    PackingParams,
    Skipped,
    Unfit,
    pack_events,
)
from bagel_core.plan.quarantine import Quarantine, read_index_quarantine
from bagel_core.sequence.grid import grid_position_ids, interpolated_position_ids
from bagel_core.sequence.layout import PackedLayout, dense_mask
from bagel_core.sequence.tokens import (
    DEFAULT_MAX_LATENT_SIZE,
    TEXT,
    VAE_DOWNSAMPLE,
    VAE_IMAGE,
    VIT_IMAGE,
    VIT_MAX_PATCHES_PER_SIDE,
    VIT_PATCH_SIZE,
    SampleRejected,
    check_strides,
    count_tokens,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Consecutive passes over a group's units without one usable sample before the worker gives up
#: (upstream would loop forever; one bad pass can be chance when only some edit spans exceed the cap).
MAX_EMPTY_PASSES = 3
#: files of one worker that may be unreadable, or changed or gone since planning, before training stops
DEFAULT_MAX_BAD_FILES = 10
#: Keys of a batch that are not model inputs.
NON_MODEL_KEYS = ("data_state",)
#: Skip reason of a sample that fits beside no pack's mandatory samples (``carry``).
UNFIT_REASON = "estimate + the pack's mandatory samples > max_num_tokens (fits no pack)"


def _output_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for one of a pack's large fields (the caller writes every element).

    Inside a DataLoader worker it is allocated in shared memory, as torch's own ``default_collate`` does
    there: a worker hands each tensor of a pack to the main process through shared memory, and one in
    ordinary memory is first copied into a new shared segment, a whole extra pass over the padded images
    (the largest field). The values are the same either way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    like = torch.empty(0, dtype=dtype)
    return like.new(like._typed_storage()._new_shared(numel)).view(shape)


def _plain_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in ordinary memory (bytes that are normalised before the pack leaves the worker)."""
    return torch.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class _Resized:
    """An image resized by its transform: its bytes are written once, when the pack is finished, straight into
    ``padded_pixels`` / ``packed_vit_pixels`` (no per-image tensor, patchify copy or padding copy). ``shape`` is
    that of its ``[3, H, W]`` pixels."""

    image: Image.Image
    transform: ImageTransform

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.image.height, self.image.width)


def _pad(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[C, H_i, W_i] tensors -> one zero-padded [N, C, max H, max W] batch (their dtype).

    Only the margins are zeroed (each tensor is written over its corner), not the whole batch first.
    """
    hmax = max(t.shape[1] for t in tensors)
    wmax = max(t.shape[2] for t in tensors)
    padded = _output_tensor((len(tensors), tensors[0].shape[0], hmax, wmax), tensors[0].dtype)
    for i, t in enumerate(tensors):
        h, w = t.shape[1], t.shape[2]
        padded[i, :, :h, :w] = t
        _zero_margins(padded[i], h, w)
    return padded


def _zero_margins(image: torch.Tensor, h: int, w: int) -> None:
    """Zero a padded ``[C, H, W]`` slot outside its ``h`` x ``w`` corner."""
    image[:, :h, w:] = 0
    image[:, h:, :] = 0


def _pad_bytes(images: list[_Resized], alloc: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Resized images -> their bytes as one zero-padded uint8 ``[N, 3, max H, max W]`` batch."""
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    padded = alloc((len(images), 3, hmax, wmax), torch.uint8)
    for i, im in enumerate(images):
        h, w = im.shape[1], im.shape[2]
        im.transform.bytes_into(im.image, padded[i, :, :h, :w])
        _zero_margins(padded[i], h, w)
    return padded


def normalise_pixels(batch: dict[str, Any], alloc: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
    """Turn a pack's image bytes (``PackedDataset(..., pixels_as_bytes=True)``) into the model's float32 fields, in
    place: ``padded_pixels`` -> ``padded_images`` (margins 0) and ``packed_vit_pixels`` -> ``packed_vit_tokens``,
    each image with its own transform's mean and std (``pixel_norms``), on the device the bytes are on
    (the trainer moves bytes, 4x smaller, and normalises there). Bit-identical to the packs the dataset
    normalises itself (``tests/test_loader_pack_digests.py``). Returns ``batch``; a pack without bytes is
    returned unchanged. ``alloc(shape, dtype)`` makes the float outputs on CPU (default: ordinary memory)."""
    norms = batch.pop("pixel_norms", None)
    if norms is None:
        return batch

    def empty(like: torch.Tensor) -> torch.Tensor:
        if like.device.type == "cpu":
            return (alloc or _plain_tensor)(tuple(like.shape), torch.float32)
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)

    if "padded_pixels" in batch:
        pixels, sizes = batch.pop("padded_pixels"), batch.pop("padded_pixel_sizes")
        images = empty(pixels)
        for i, ((h, w), which) in enumerate(zip(sizes, batch.pop("padded_pixel_norms"))):
            normalise_bytes(pixels[i, :, :h, :w], *norms[which], images[i, :, :h, :w], 0)
            _zero_margins(images[i], h, w)
        batch["padded_images"] = images
    if "packed_vit_pixels" in batch:
        pixels = batch.pop("packed_vit_pixels")
        tokens, start = empty(pixels), 0
        for n, which in zip(batch["vit_token_seqlens"].tolist(), batch.pop("vit_pixel_norms")):
            rows = slice(start, start + n)
            normalise_bytes(pixels[rows].view(-1, 3), *norms[which], tokens[rows].view(-1, 3), 1)
            start += n
        batch["packed_vit_tokens"] = tokens
    return batch


def _longs(values: list[int]) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.long)``, the same tensor, built through numpy: ~3x faster on the
    pack's long index lists (numpy converts the Python ints in one C loop)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _floats(values: list[float]) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.float32)`` through numpy (each double rounded to float32 as torch does)."""
    return torch.from_numpy(np.array(values, dtype=np.float32))


@functools.lru_cache(maxsize=4096)
def _grid_ids(rows: int, cols: int, side: int, interpolate: bool) -> torch.Tensor:
    """2-D ids of a grid, extrapolated or interpolated (data-format.md 9.2).

    Cached: a dataset has few distinct grids and every image needs one. Callers only read the tensor
    (``finish`` concatenates them into a new one), never write it.
    """
    return interpolated_position_ids(rows, cols, side) if interpolate else grid_position_ids(rows, cols, side)


# ---- one pack -------------------------------------------------------------------------------------
class PackBuilder:
    """Accumulates samples into the fields of data-format.md 11 (positions 9.1, modes 9.3)."""

    def __init__(
        self,
        token_ids: dict[str, int],
        max_latent_size: int,
        vit_side: int,
        interpolate_pos: bool,
        transforms: dict[tuple[str, str], ImageTransform],
        multi_image_groups: set[str],
        latents: LatentCache | None = None,
        pixels_as_bytes: bool = False,
    ) -> None:
        self.bos, self.eos = token_ids["bos_token_id"], token_ids["eos_token_id"]
        self.soi, self.eoi = token_ids["start_of_image"], token_ids["end_of_image"]
        self.max_latent_size, self.vit_side, self.interpolate = max_latent_size, vit_side, interpolate_pos
        self.transforms = transforms
        self.multi_image_groups = multi_image_groups  # VLM: the pixel budget is split over the images
        self.latents = latents  # VAE moments encoded once (latent_cache.py); None: every image goes to the VAE live
        self.pixels_as_bytes = pixels_as_bytes  # hand images over as bytes (normalise_pixels), not float32
        self.reset()

    def reset(self) -> None:
        self.cur = 0
        self.sample_lens: list[int] = []
        self.text_ids: list[int] = []
        self.text_idx: list[int] = []
        self.pos_ids: list[int] = []
        self.split_lens: list[int] = []
        self.attn_modes: list[str] = []
        self.vae_images: list[_Resized] = []
        self.vae_moments: list[torch.Tensor] = []
        self.vae_from_cache: list[bool] = []
        self.vae_shapes: list[tuple[int, int]] = []
        self.lat_pos: list[torch.Tensor] = []
        self.vae_idx: list[int] = []
        self.taus: list[float] = []
        self.mse_idx: list[int] = []
        self.vit_tokens: list[_Resized] = []
        self.vit_pos: list[torch.Tensor] = []
        self.vit_idx: list[int] = []
        self.vit_lens: list[int] = []
        self.labels: list[int] = []
        self.ce_idx: list[int] = []
        self.ce_weights: list[float] = []
        self.data_indexes: list[dict[str, Any]] = []

    @property
    def empty(self) -> bool:
        return not self.sample_lens

    def _pixels(self, sample: LoadedSample, item, cache: dict) -> _Resized:
        """The item's image resized by its transform (once per sample); :meth:`finish` writes its bytes."""
        key = (item.kind, item.image_index)
        if key not in cache:
            transform = self.transforms[(sample.group, item.kind)]
            img_num = len(sample.images) if sample.group in self.multi_image_groups else 1
            pixels = _Resized(transform.resize(sample.images[item.image_index], img_num), transform)
            if (pixels.shape[2], pixels.shape[1]) != tuple(item.image_size):
                raise DataError(
                    f"{sample.group}: resized to {tuple(pixels.shape[1:])} but the plan says "
                    f"{item.image_size} (transform and plan disagree)"
                )
            cache[key] = pixels
        return cache[key]

    def _cached_moments(self, sample: LoadedSample, item) -> torch.Tensor | None:
        """The image's moments from the latent cache, when it holds them at the plan's size."""
        if self.latents is None:
            return None
        moments = self.latents.lookup(
            sample.group, sample.source_file, sample.row_group, sample.row_index, item.image_index
        )
        if moments is None or (moments.shape[2] * VAE_STRIDE, moments.shape[1] * VAE_STRIDE) != tuple(item.image_size):
            return None  # not cached (or at another size: the transform changed) -> encoded live
        return moments

    def add(self, sample: LoadedSample, dropped: set[int], rng: random.Random, worker_id: int = 0) -> int:
        """Append one sample with the items ``dropped`` (CFG) left out; returns the tokens it occupies.

        ``rng`` draws the noised images' timesteps. Also records the sample's ``batch_data_indexes``
        entry (upstream's resume cursor plus its index key and token counts).
        """
        start, rope = self.cur, 0
        cache: dict = {}
        for index, item in enumerate(sample.plan.items):
            if index in dropped:
                rope += 0 if item.kind == TEXT else 1  # dropped images still advance RoPE (9.1)
                continue
            cur = self.cur
            if item.kind == TEXT:
                ids = list(item.text_ids)
                n = len(ids)
                self.text_ids += [self.bos, *ids, self.eos]
                self.text_idx += range(cur, cur + n + 2)
                self.pos_ids += range(rope, rope + n + 2)
                if item.loss:
                    self.ce_idx += range(cur, cur + n + 1)
                    self.labels += [*ids, self.eos]
                    self.ce_weights += [1.0 / math.sqrt(n + 1)] * (n + 1)
                self.split_lens.append(n + 2)
                self.attn_modes.append("causal")
                self.cur += n + 2
                rope += n + 2
                continue
            moments = self._cached_moments(sample, item) if item.kind == VAE_IMAGE else None
            if moments is not None:
                rows, cols = (
                    (moments.shape[1] * VAE_STRIDE) // VAE_DOWNSAMPLE,
                    (moments.shape[2] * VAE_STRIDE) // VAE_DOWNSAMPLE,
                )
            else:
                pixels = self._pixels(sample, item, cache)
                patch = VIT_PATCH_SIZE if item.kind == VIT_IMAGE else VAE_DOWNSAMPLE
                rows, cols = pixels.shape[1] // patch, pixels.shape[2] // patch
            n = rows * cols
            self.text_ids += [self.soi, self.eoi]
            self.text_idx += [cur, cur + n + 1]
            self.pos_ids += [rope] * (n + 2)
            inner = range(cur + 1, cur + 1 + n)
            if item.kind == VIT_IMAGE:
                self.vit_tokens.append(pixels)  # patchified by finish, into packed_vit_pixels
                self.vit_pos.append(_grid_ids(rows, cols, self.vit_side, self.interpolate))
                self.vit_idx += inner
                self.vit_lens.append(n)
                self.attn_modes.append("full")
                rope += 1
            elif item.kind == VAE_IMAGE:
                if moments is not None:
                    self.vae_moments.append(moments)
                else:
                    self.vae_images.append(pixels)
                self.vae_from_cache.append(moments is not None)
                self.vae_shapes.append((rows, cols))
                self.lat_pos.append(_grid_ids(rows, cols, self.max_latent_size, self.interpolate))
                self.vae_idx += inner
                if item.loss:
                    tau = rng.gauss(0.0, 1.0)  # one standard-normal draw per noised image (10)
                    self.taus += [tau] * n
                    self.mse_idx += inner
                    self.attn_modes.append("noise")  # noised images do not advance RoPE
                else:
                    self.taus += [float("-inf")] * n
                    self.attn_modes.append("full")
                    rope += 1
            else:
                raise DataError(f"unknown plan item kind {item.kind!r}")
            self.split_lens.append(n + 2)
            self.cur += n + 2
        length = self.cur - start
        self.sample_lens.append(length)
        self.data_indexes.append(
            {
                "data_indexes": copy.deepcopy(sample.cursor),
                "worker_id": worker_id,
                "dataset_name": sample.group,
                "dataset": sample.dataset,
                "source_file": sample.source_file,
                "row_group": sample.row_group,
                "row_index": sample.row_index,
                "num_tokens": length,
                "est_tokens": sample.count.estimate,
                "dropped": sorted(dropped),
            }
        )
        return length

    def _vit_bytes(self, alloc: Callable[..., torch.Tensor]) -> torch.Tensor:
        """All ViT patches of the pack as bytes, uint8 ``[sum n, p*p*3]``: each image patchified straight into its
        rows of one tensor."""
        out = alloc((sum(self.vit_lens), VIT_PATCH_SIZE * VIT_PATCH_SIZE * 3), torch.uint8)
        start = 0
        for image, n in zip(self.vit_tokens, self.vit_lens):
            image.transform.patch_bytes_into(image.image, VIT_PATCH_SIZE, out[start : start + n])
            start += n
        return out

    def _pixels_fields(self) -> dict[str, Any]:
        """The pack's images as bytes plus, per image, the index of its transform's (mean, std) in ``pixel_norms``.

        Handed over as they are (``pixels_as_bytes``: shared memory holds a quarter of the float bytes and the
        worker does no normalising), or normalised here into float32 tensors in shared memory."""
        if not self.vae_images and not self.vit_tokens:
            return {}
        alloc = _output_tensor if self.pixels_as_bytes else _plain_tensor
        norms: list[tuple[tuple[float, ...], tuple[float, ...]]] = []

        def norm_index(image: _Resized) -> int:
            if image.transform.norm not in norms:
                norms.append(image.transform.norm)
            return norms.index(image.transform.norm)

        fields: dict[str, Any] = {}
        if self.vae_images:
            fields.update(
                padded_pixels=_pad_bytes(self.vae_images, alloc),
                padded_pixel_sizes=[(im.shape[1], im.shape[2]) for im in self.vae_images],
                padded_pixel_norms=[norm_index(im) for im in self.vae_images],
            )
        if self.vit_tokens:
            fields.update(
                packed_vit_pixels=self._vit_bytes(alloc), vit_pixel_norms=[norm_index(im) for im in self.vit_tokens]
            )
        fields["pixel_norms"] = [(list(mean), list(std)) for mean, std in norms]
        return fields

    def finish(self, nested_masks: bool, pad_to: int | None) -> dict[str, Any]:
        long = torch.long
        batch: dict[str, Any] = {
            "sequence_length": self.cur,
            "sample_lens": list(self.sample_lens),
            "packed_text_ids": _longs(self.text_ids),
            "packed_text_indexes": _longs(self.text_idx),
            "packed_position_ids": _longs(self.pos_ids),
            "split_lens": list(self.split_lens),
            "attn_modes": list(self.attn_modes),
        }
        if nested_masks:
            layout = PackedLayout.from_splits(self.sample_lens, self.split_lens, self.attn_modes)
            masks = []
            for s, e in layout.doc_bounds():
                mask = torch.zeros(e - s, e - s)
                mask.masked_fill_(~dense_mask(layout, s, e), float("-inf"))
                masks.append(mask)
            batch["nested_attention_masks"] = masks
        if pad_to is not None and pad_to > self.cur:  # flex padding (8.3): its own causal document
            batch["sample_lens"].append(pad_to - self.cur)
            batch["split_lens"].append(pad_to - self.cur)
            batch["attn_modes"].append("causal")
        batch.update(self._pixels_fields())
        if self.vae_shapes:
            if self.vae_moments:  # only with a latent cache: which VAE images (in order) are moments
                batch.update(padded_moments=_pad(self.vae_moments), vae_from_cache=list(self.vae_from_cache))
            batch.update(
                patchified_vae_latent_shapes=list(self.vae_shapes),
                packed_latent_position_ids=torch.cat(self.lat_pos).to(long),
                packed_vae_token_indexes=_longs(self.vae_idx),
                packed_timesteps=_floats(self.taus),
                mse_loss_indexes=_longs(self.mse_idx),
            )
        if self.vit_tokens:
            batch.update(
                packed_vit_position_ids=torch.cat(self.vit_pos).to(long),
                packed_vit_token_indexes=_longs(self.vit_idx),
                vit_token_seqlens=_longs(self.vit_lens),
            )
        if self.ce_idx:
            batch.update(
                packed_label_ids=_longs(self.labels),
                ce_loss_indexes=_longs(self.ce_idx),
                ce_loss_weights=_floats(self.ce_weights),
            )
        batch["batch_data_indexes"] = list(self.data_indexes)
        self.reset()
        return batch if self.pixels_as_bytes else normalise_pixels(batch, _output_tensor)


# ---- state helpers ------------------------------------------------------------------------------------
def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


#: Counters per group and reason, and per group.
_BY_REASON = ("skipped", "quarantined")
_BY_GROUP = ("packed", "buffered", "carried", "discarded_on_overflow")


def _new_counters() -> dict[str, Any]:
    return {**{k: {} for k in (*_BY_REASON, *_BY_GROUP)}, "empty_flushes": 0}


def _count(counter: dict[str, Any], group: str, reason: str | None = None) -> None:
    """Add one to ``counter[group]`` (or to ``counter[group][reason]``)."""
    if reason is None:
        counter[group] = counter.get(group, 0) + 1
        return
    reasons = counter.setdefault(group, {})
    reasons[reason] = reasons.get(reason, 0) + 1


def merge_counters(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters of several worker states (per group and reason)."""
    out = _new_counters()
    for state in states:
        c = {**_new_counters(), **state["counters"]}  # states saved before a counter existed lack it
        for key in _BY_REASON:
            for group, reasons in c[key].items():
                mine = out[key].setdefault(group, {})
                for reason, n in reasons.items():
                    mine[reason] = mine.get(reason, 0) + n
        for key in _BY_GROUP:
            for group, n in c[key].items():
                out[key][group] = out[key].get(group, 0) + n
        out["empty_flushes"] += c["empty_flushes"]
    return out


def check_packing_mode(state: dict[str, Any], mode: str) -> None:
    """A resume state continues exactly only under the packing mode it was saved with (a state without
    one predates ``carry``: it was packed the upstream way)."""
    saved = state.get("packing", UPSTREAM)
    if saved != mode:
        raise ConfigError(
            f"data resume state was packed with --packing {saved}, this run packs with --packing {mode}: pass "
            f"--packing {saved} to resume exactly (the packs after the checkpoint depend on the mode)"
        )


# ---- one worker -------------------------------------------------------------------------------------
class _Worker:
    """One (rank, logical worker): its streams, packer RNG, overflow buffer, counters and builder."""

    def __init__(self, ds: PackedDataset, worker_id: int, state: dict[str, Any] | None) -> None:
        self.ds, self.worker_id = ds, worker_id
        units = ds.worker_units[worker_id]
        self.groups: list[GroupConfig] = list(ds.dataset_config.groups.values())
        self.names = [g.group for g in self.groups]
        self.read = [g.weight > 0 or g.is_mandatory for g in self.groups]
        self.streams: list[UnitStream | None] = []
        for g, used in zip(self.groups, self.read):
            if not used:
                self.streams.append(None)
                continue
            if g.group not in units:
                raise ConfigError(f"{ds.manifest_dir}: the manifest has no group {g.group!r}; rebuild it")
            roots = {name: str(ds.registry.get(g.group, name).data_dir) for name in g.dataset_names}
            self.streams.append(UnitStream(g.group, g.task, units[g.group], roots, max_bad_files=ds.max_bad_files))
        self.rng = random.Random(f"bagel-packer|{ds.seed}|{ds.rank}|{worker_id}")
        self.buffer: deque[tuple[LoadedSample, int]] = deque()
        self.counters = _new_counters()
        self.accepted = {name: 0 for name in self.names}  # samples packed/buffered/discarded in this pass
        self.empty_passes = {name: 0 for name in self.names}  # consecutive passes without any
        self.last_cursor: dict[str, Any] = {name: None for name in self.names}
        self.packs = 0
        self.builder = PackBuilder(
            ds.token_ids,
            ds.max_latent_size,
            ds.vit_max_patches_per_side,
            ds.interpolate_pos,
            ds.transforms,
            ds.multi_image_groups,
            ds.latent_cache,
            ds.pixels_as_bytes,
        )
        if state is not None:
            self._load(state)
        for name, stream in zip(self.names, self.streams):
            if stream is not None:
                log.info(
                    "rank-%d worker-%d dataset-%s: resuming data at %s (pass %d, %d buffered)",
                    ds.rank,
                    worker_id,
                    name,
                    stream.cursor(stream.position),
                    stream.passes,
                    len(self.buffer),
                )

    # ---- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        ds = self.ds
        streams = {}
        for name, stream in zip(self.names, self.streams):
            if stream is not None:
                streams[name] = dict(
                    stream.state(), accepted_in_pass=self.accepted[name], empty_passes=self.empty_passes[name]
                )
        return {
            "version": STATE_VERSION,
            "seed": ds.seed,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": ds.num_workers,
            "worker_id": self.worker_id,
            "packing": ds.params.mode,
            "packs": self.packs,
            "streams": streams,
            "data_status": {
                name: {self.worker_id: copy.deepcopy(self.last_cursor[name])}
                for name in self.names
                if self.last_cursor[name] is not None
            },
            "packer_rng": _rng_state(self.rng),
            "buffer": [sample.ref() for sample, _ in self.buffer],
            "counters": copy.deepcopy(self.counters),
        }

    def _load(self, state: dict[str, Any]) -> None:
        ds = self.ds
        for key, mine in (
            ("seed", ds.seed),
            ("rank", ds.rank),
            ("world_size", ds.world_size),
            ("num_workers", ds.num_workers),
            ("worker_id", self.worker_id),
        ):
            if state.get(key) != mine:
                raise ConfigError(
                    f"data resume state was saved with {key}={state.get(key)}, this run has {mine}; "
                    "exact resume needs the same seed, rank, world size and num_workers"
                )
        check_packing_mode(state, ds.params.mode)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data resume state version {state.get('version')} != {STATE_VERSION}")
        for name, group, stream in zip(self.names, self.groups, self.streams):
            if stream is None:
                continue
            saved = state["streams"].get(name)
            if saved is None:
                raise ConfigError(f"data resume state has no position for group {name!r} (dataset config changed?)")
            stream.load(saved)
            self.accepted[name] = int(saved["accepted_in_pass"])
            self.empty_passes[name] = int(saved["empty_passes"])
            if not group.resume_data_status:
                stream.position = (0, 0, 0)
                log.info(
                    "rank-%d worker-%d %s: resume_data_status is false, restarting its units",
                    ds.rank,
                    self.worker_id,
                    name,
                )
        for name, status in state["data_status"].items():
            self.last_cursor[name] = copy.deepcopy(next(iter(status.values())))
        _set_rng_state(self.rng, state["packer_rng"])
        self.counters = {**_new_counters(), **copy.deepcopy(state["counters"])}
        self.packs = int(state["packs"])
        for ref in state["buffer"]:
            g = self.names.index(ref["group"])
            stream = self.streams[g]
            pos = tuple(int(v) for v in ref["position"])
            record = stream.read_at(pos)  # type: ignore[union-attr]
            if isinstance(record, ReadFailure):
                raise DataError(f"resume: buffered sample {ref} can no longer be read ({record.reason})")
            try:
                sample = self._decode(g, pos, record, int(ref["visit"]))
            except SampleRejected as exc:
                raise DataError(f"resume: buffered sample {ref} can no longer be decoded ({exc.reason})") from exc
            self.buffer.append((sample, g))

    # ---- packer callbacks -------------------------------------------------------------------------
    def _decode(self, g: int, pos, record, visit: int) -> LoadedSample:
        ds = self.ds
        rng = plan_rng(ds.seed, ds.rank, self.worker_id, self.names[g], visit, "plan")
        group = self.names[g]
        cached = None
        if ds.latent_cache is not None:

            def cached(source_file: str, row_group: int, row_index: int, image: int) -> bool:
                return ds.latent_cache.holds(group, source_file, row_group, row_index, image)

        return decode_sample(self.streams[g], g, self.groups[g], pos, record, visit, ds.ids_of, rng, cached)

    def _skip(self, group: str, reason: str, where: Any) -> None:
        reasons = self.counters["skipped"].setdefault(group, {})
        reasons[reason] = reasons.get(reason, 0) + 1
        log.warning(
            "rank-%d worker-%d %s: skipped sample at %s: %s", self.ds.rank, self.worker_id, group, where, reason
        )

    def _quarantined(self, stream: UnitStream, pos) -> bool:
        """Whether the index quarantined the record at ``pos`` (then counted, and never read)."""
        quarantine = self.ds.quarantine
        if quarantine is None:
            return False
        reason = quarantine.reason(*stream.source(pos))
        if reason is None:
            return False
        _count(self.counters["quarantined"], stream.group, reason)
        log.info(
            "rank-%d worker-%d %s: passed over quarantined sample at %s (%s)",
            self.ds.rank,
            self.worker_id,
            stream.group,
            stream.cursor(pos),
            reason,
        )
        return True

    def next_sample(self, g: int) -> LoadedSample:
        stream = self.streams[g]
        name = self.names[g]
        if stream is None:
            raise DataError(f"{name}: the packer drew a group with weight 0 that is not mandatory")
        while True:
            pos, visit, wrapped = stream.advance()
            if wrapped:
                log.info("%s repeat in rank-%d worker-%d", name, self.ds.rank, self.worker_id)
                self.empty_passes[name] = 0 if self.accepted[name] else self.empty_passes[name] + 1
                if self.empty_passes[name] >= MAX_EMPTY_PASSES:
                    raise DataError(
                        f"{name}: {MAX_EMPTY_PASSES} full passes over the {len(stream.units)} unit(s) of "
                        f"rank-{self.ds.rank} worker-{self.worker_id} gave no usable sample (skips: "
                        f"{self.counters['skipped'].get(name, {})}, quarantined: "
                        f"{self.counters['quarantined'].get(name, {})}); fix the data or the caps"
                    )
                self.accepted[name] = 0
            self.last_cursor[name] = stream.cursor(pos)
            if self._quarantined(stream, pos):
                continue
            record = stream.read_at(pos)
            if isinstance(record, ReadFailure):
                self._skip(name, record.reason, stream.cursor(pos))
                continue
            try:
                return self._decode(g, pos, record, visit)
            except SampleRejected as exc:
                self._skip(name, exc.reason, stream.cursor(pos))

    def pack(self, sample: LoadedSample) -> int:
        ds = self.ds
        rng = plan_rng(ds.seed, ds.rank, self.worker_id, sample.group, sample.visit, "pack")
        probs = {TEXT: ds.dropout.text, VIT_IMAGE: ds.dropout.vit, VAE_IMAGE: ds.dropout.vae}
        dropped = {i for i, item in enumerate(sample.plan.items) if item.enable_cfg and rng.random() < probs[item.kind]}
        count = count_tokens(sample.plan, dropped)
        added = self.builder.add(sample, dropped, rng, self.worker_id)
        if added != count.total or count.estimate != sample.count.estimate:
            raise DataError(f"{sample.group}: packed {added} tokens but count_tokens says {count.total}")
        return count.total

    # ---- the loop ---------------------------------------------------------------------------------
    def _note(self, event: Packed | Buffered | Skipped | Unfit) -> None:
        """Count (and log) one packer decision other than a flush."""
        c, name = self.counters, self.names[event.group]
        if isinstance(event, (Packed, Buffered)):
            _count(c["packed" if isinstance(event, Packed) else "buffered"], name)
            self.accepted[name] += 1
            return
        if isinstance(event, Skipped):
            reason = f"estimate {'>=' if event.mandatory else '>'} max_num_tokens_per_sample"
            line = "rank-%d worker-%d: skip a sample with length %d (%s %s)"
        else:
            reason = UNFIT_REASON
            line = "rank-%d worker-%d: skip a sample with length %d (%s %s): it fits beside no pack's mandatory samples"
        _count(c["skipped"], name, reason)
        log.info(line, self.ds.rank, self.worker_id, event.estimate, name, event.sample.cursor)

    def _note_overflow(self, event: Flush) -> None:
        """Count (and log) the sample that forced an overflow flush: discarded (upstream) or carried."""
        discarded = event.discarded is not None
        sample = event.discarded if discarded else event.carried
        if sample is None:
            return
        name = self.names[event.discarded_group if discarded else event.carried_group]
        _count(self.counters["discarded_on_overflow" if discarded else "carried"], name)
        self.accepted[name] += 1
        log.info(
            "rank-%d worker-%d: Yielding data with length %d; %s %s sample %s (overflow)",
            self.ds.rank,
            self.worker_id,
            event.length,
            "discarded" if discarded else "carried to the next pack:",
            name,
            sample.cursor,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.ds
        for event in pack_events(
            ds.params,
            [g.weight for g in self.groups],
            [g.is_mandatory for g in self.groups],
            self.next_sample,
            lambda s: s.estimate,
            self.pack,
            self.rng,
            buffer=self.buffer,
        ):
            if not isinstance(event, Flush):
                self._note(event)
                continue
            self._note_overflow(event)
            if self.builder.empty:
                self.counters["empty_flushes"] += 1
                continue
            batch = self.builder.finish(ds.nested_masks, ds.params.max_num_tokens if ds.flex_padding else None)
            self.packs += 1
            batch["data_state"] = self.state()
            yield batch


# ---- the dataset ------------------------------------------------------------------------------------
class PackedDataset(IterableDataset):
    """One rank's packed BAGEL batches (module docstring: layout, counters, resume design).

    ``num_workers`` must equal the DataLoader's (0 = iterate in the main process) and the
    manifest's. ``dropout``: CFG drop probabilities (section 10; ``NO_DROPOUT`` disables).
    ``flex_padding``: append the pad document up to ``max_num_tokens`` (8.3). ``nested_masks``: also
    build the dense per-sample masks of the non-flex path. ``quarantine``: an index (directory or
    file) whose quarantined samples are passed over unread; default: the list the manifest carries
    (planned with ``--index``), else none. ``params.mode``: the packing mode (``carry`` by default).
    ``latent_cache``: VAE images found there travel as moments (``padded_moments``, ``vae_from_cache``)
    instead of pixels; the trainer samples their latents (:func:`~bagel_core.loader.latent_cache.pack_latents`).
    ``pixels_as_bytes``: images travel as uint8 (``padded_pixels``, ``packed_vit_pixels``, ...) for the consumer
    to normalise with :func:`normalise_pixels` (the trainer, on its device), instead of as float32 tensors.
    """

    def __init__(
        self,
        dataset_config: DatasetConfig,
        registry: Registry,
        manifest_dir: str | Path,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        params: PackingParams | None = None,
        dropout: CfgDropout | None = None,
        seed: int = 0,
        tokenizer: Any = None,
        max_latent_size: int = DEFAULT_MAX_LATENT_SIZE,
        vit_max_patches_per_side: int = VIT_MAX_PATCHES_PER_SIDE,
        interpolate_pos: bool = False,
        nested_masks: bool = False,
        flex_padding: bool = False,
        quarantine: str | Path | None = None,
        max_bad_files: int = DEFAULT_MAX_BAD_FILES,
        latent_cache: LatentCache | None = None,
        pixels_as_bytes: bool = False,
    ) -> None:
        super().__init__()
        dataset_config.check_against(registry)
        self.dataset_config, self.registry = dataset_config, registry
        self.manifest_dir = str(manifest_dir)
        meta = read_manifest_meta(manifest_dir)
        for key, mine in (("world_size", world_size), ("num_workers", num_workers)):
            if meta[key] != mine:
                raise ConfigError(
                    f"{manifest_dir}: manifest built for {key}={meta[key]}, dataset has {mine}; "
                    "rebuild it with `bagel data plan`"
                )
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        # Every worker's units are read here, in the main process: polars (the manifest reader) is not
        # fork-safe once its thread pool ran, and DataLoader workers are forked.
        self.worker_units = {
            w: read_manifest(manifest_dir, rank, w, world_size=world_size, num_workers=num_workers)
            for w in range(max(num_workers, 1))
        }
        self.params = params or PackingParams()
        self.quarantine = self._quarantine(quarantine)
        self.max_bad_files = max_bad_files
        self.latent_cache = latent_cache
        self.pixels_as_bytes = pixels_as_bytes
        self.dropout = dropout if dropout is not None else CfgDropout()
        self.seed = seed
        self.max_latent_size, self.vit_max_patches_per_side = max_latent_size, vit_max_patches_per_side
        self.interpolate_pos, self.nested_masks, self.flex_padding = interpolate_pos, nested_masks, flex_padding
        if tokenizer is None:
            tokenizer, new_ids = load_tokenizer()
        else:
            new_ids = special_token_ids(tokenizer)
        self.tokenizer = tokenizer
        self.token_ids = new_ids.as_dict()
        self.ids_of = make_ids_of(tokenizer)
        self.transforms: dict[tuple[str, str], ImageTransform] = {}
        self.multi_image_groups = {g.group for g in dataset_config.groups.values() if g.task == "vlm"}
        for g in dataset_config.groups.values():
            where = f"{dataset_config.source or '<dataset config>'}: {g.group}"
            if g.task == "vlm":
                check_strides(None, g.image_transform_args, where)
                self.transforms[(g.group, VIT_IMAGE)] = ImageTransform.from_args(g.image_transform_args)
            else:
                check_strides(g.image_transform_args, g.vit_image_transform_args, where)
                self.transforms[(g.group, VAE_IMAGE)] = ImageTransform.from_args(g.image_transform_args)
                if g.vit_image_transform_args is not None:
                    self.transforms[(g.group, VIT_IMAGE)] = ImageTransform.from_args(g.vit_image_transform_args)
        self._states: dict[int, dict[str, Any]] = {}
        self._worker_local: tuple[int, dict[str, Any]] | None = None  # inside a DataLoader worker only
        self._next_worker = 0
        self._batches = 0

    def _quarantine(self, index: str | Path | None) -> Quarantine | None:
        """The known-bad samples to pass over: ``index``'s for the configured datasets, else the manifest's."""
        if index is None:
            quarantine = read_manifest_quarantine(self.manifest_dir)
        else:
            pairs = [(g.group, d) for g in self.dataset_config.groups.values() for d in g.dataset_names]
            quarantine = Quarantine.from_table(read_index_quarantine(index, pairs))
        if quarantine is not None:
            log.info("rank-%d: %d quarantined sample(s) will be passed over unread", self.rank, len(quarantine))
        return quarantine

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, running = (info.id, info.num_workers) if info is not None else (0, 0)
        if running != self.num_workers:
            raise ConfigError(
                f"PackedDataset built for num_workers={self.num_workers} but iterated with {running} DataLoader workers"
            )
        slots = max(self.num_workers, 1)
        if info is not None and self._worker_local is not None:
            # a persistent worker iterated again: continue its own stream rather than replay it
            logical, state = self._worker_local
        else:
            logical = (physical + self._next_worker) % slots
            state = copy.deepcopy(self._states.get(logical))
        worker = _Worker(self, logical, state)
        for batch in worker:
            if info is None:
                self._remember(batch["data_state"])
            else:
                self._worker_local = (logical, batch["data_state"])
            yield batch

    def worker_packs(self, worker: int) -> Iterator[dict[str, Any]]:
        """Logical worker ``worker``'s packs in order, iterated here (no DataLoader, nothing recorded), from its
        loaded state or the start: the packs a training's DataLoader takes from that worker, round-robin
        (pack ``k`` of a rank comes from worker ``k % num_workers``). For replaying which samples a run reads."""
        if not 0 <= worker < max(self.num_workers, 1):
            raise ConfigError(f"worker {worker} is not one of this dataset's {max(self.num_workers, 1)} worker(s)")
        return iter(_Worker(self, worker, copy.deepcopy(self._states.get(worker))))

    # ---- resume -----------------------------------------------------------------------------------
    def _remember(self, state: dict[str, Any]) -> None:
        w = int(state["worker_id"])
        old = self._states.get(w)
        if old is not None and old["packs"] >= state["packs"]:
            return  # already recorded (in-process auto-record + explicit record of the same batch)
        self._states[w] = state
        self._batches += 1
        self._next_worker = (w + 1) % max(self.num_workers, 1)

    def record(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Mark ``batch`` as consumed (trained on): pops its ``data_state`` and keeps it as its worker's
        latest. Returns the batch, now holding model inputs only."""
        state = batch.pop("data_state", None)
        if state is None:
            raise DataError("batch has no data_state (already recorded, or not from PackedDataset)")
        self._remember(state)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last recorded batch (module docstring)."""
        data_status: dict[str, dict[int, Any]] = {}
        for state in self._states.values():
            for group, status in state["data_status"].items():
                data_status.setdefault(group, {}).update(status)
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "packing": self.params.mode,
            "next_worker": self._next_worker,
            "batches": self._batches,
            "workers": copy.deepcopy(self._states),
            "data_status": data_status,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("version", STATE_VERSION),
            ("rank", self.rank),
            ("world_size", self.world_size),
            ("num_workers", self.num_workers),
            ("seed", self.seed),
        ):
            if state.get(key) != mine:
                raise ConfigError(
                    f"data resume state has {key}={state.get(key)}, this dataset has {mine}; "
                    "exact resume needs the same seed, rank, world size and num_workers"
                )
        check_packing_mode(state, self.params.mode)
        self._states = {int(w): copy.deepcopy(s) for w, s in state["workers"].items()}
        self._next_worker = int(state["next_worker"])
        self._batches = int(state["batches"])

    def counters(self) -> dict[str, Any]:
        """Skips (per group and reason), packed/buffered/discarded samples, summed over the recorded
        workers as of their last recorded batch."""
        return merge_counters(list(self._states.values()))


def collate_packed(batch: dict[str, Any]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` with ``batch_size=None``: the pack is already a batch."""
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its non-model keys (for ``Bagel.forward(**...)`` after VAE encoding)."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
