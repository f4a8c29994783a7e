"""Bit-exact pin of the packs :class:`PackedDataset` yields, taken before the loader was sped up (issue #13.4).

Every value of every pack goes into the digest: each tensor's dtype, shape and raw bytes (the image
pixels and ViT patches included, so decoding, resizing and normalisation are pinned too), every list
and int field, ``batch_data_indexes`` (file names only: the folders are temporary) and the worker
state a pack carries (minus the unit-list fingerprints, which hash the temporary paths). A faster
loader must leave them all unchanged; a digest that moves means an output value moved.

Two datasets: the stats fixture (PNG, every plan kind, both resize directions, the VLM multi-image
budget) and a small copy of the built-in example (JPEG, RGBA PNG with transparency, palette-free
RGB PNG), both with the small transforms of :mod:`packed_fixtures`. Packs are taken in-process (one
worker) in both packing modes, with nested masks, flex padding and interpolated positions once, and
through a real 2-worker DataLoader (both workers' streams, interleaved as the trainer sees them).

The image digests depend on the pinned Pillow / torch / numpy builds (resampling and JPEG decoding);
after a deliberate upgrade of one of them, re-take the digests with the loader code of the previous
commit and say so in the commit message.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from packed_fixtures import SMALL_EDIT_VIT, SMALL_PARAMS, SMALL_VAE, SMALL_VLM_VIT, make_manifest, small_fixture
from PIL import Image
from stats_fixtures import Fixture
from torch.utils.data import DataLoader

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.data.transforms import ImageTransform, byte_lut, gather_bytes, normalise_bytes
from bagel_core.loader.packed_dataset import PackedDataset, collate_packed, normalise_pixels
from bagel_core.plan.packing import PackingParams
from bagel_core.sequence.grid import patchify

CARRY = SMALL_PARAMS
UPSTREAM = PackingParams(
    expected_num_tokens=CARRY.expected_num_tokens,
    max_num_tokens=CARRY.max_num_tokens,
    max_num_tokens_per_sample=CARRY.max_num_tokens_per_sample,
    prefer_buffer_before=CARRY.prefer_buffer_before,
    max_buffer_size=CARRY.max_buffer_size,
    mode="upstream",
)
PACKS = 12


# ---- digest ----------------------------------------------------------------------------------------
def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` with its type, recursively; tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"no digest rule for {type(value).__name__}")


def _portable(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without what names the temporary folders (source paths, unit-list fingerprints)."""
    out = dict(batch)
    out["batch_data_indexes"] = [
        dict(d, source_file=os.path.basename(d["source_file"])) for d in batch["batch_data_indexes"]
    ]
    state = dict(batch["data_state"])
    state["streams"] = {name: {k: v for k, v in s.items() if k != "units"} for name, s in state["streams"].items()}
    out["data_state"] = state
    return out


def packs_digest(batches: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        _feed(digest, _portable(batch))
    return digest.hexdigest()


# ---- data ------------------------------------------------------------------------------------------
def _small_transforms(groups_yaml: Path) -> None:
    groups = yaml.safe_load(groups_yaml.read_text())
    groups["t2i_pretrain"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["vit_image_transform_args"] = dict(SMALL_EDIT_VIT)
    groups["vlm_sft"]["image_transform_args"] = dict(SMALL_VLM_VIT)
    groups_yaml.write_text(yaml.safe_dump(groups, sort_keys=False))


def example_fixture(root: Path) -> Fixture:
    """A small built-in example (JPEG and RGBA images) with a registry and the small transforms."""
    from bagel_core.config.discover import default_dataset_config, discover_registry
    from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

    data = write_example_dataset(
        root / "data",
        ExampleConfig(t2i_files=2, t2i_rows_per_file=12, edit_files=2, edit_rows_per_row_group=4, vlm_lines=40),
    )
    registry = discover_registry(data, parquet_info_dir=root / "registry" / "parquet_info")
    registry.source = root / "registry" / "dataset_info.yaml"
    registry.save(registry.source)
    groups = root / "registry" / "groups.yaml"
    default_dataset_config(registry).save(groups)
    _small_transforms(groups)
    return Fixture(root, registry.source, groups, root / "index", [], [], data / "vlm" / "llava_ov_si.jsonl")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Fixture, Path, Path]]:
    """name -> (fixture, manifest for in-process iteration, manifest for 2 DataLoader workers)."""
    root = tmp_path_factory.mktemp("digests")
    out = {}
    for name, fx in (("fixture", small_fixture(root / "fixture")), ("example", example_fixture(root / "example"))):
        out[name] = (fx, make_manifest(fx, root / f"{name}-m0"), make_manifest(fx, root / f"{name}-m2", num_workers=2))
    return out


def _dataset(fx: Fixture, manifest: Path, params: PackingParams, **kwargs: Any) -> PackedDataset:
    config = load_dataset_config(fx.groups)
    return PackedDataset(config, Registry.load(fx.registry), manifest, params=params, seed=3, **kwargs)


# ---- pins ------------------------------------------------------------------------------------------
IN_PROCESS = {
    # (data, packing params, extra dataset arguments)
    "fixture-carry": ("fixture", CARRY, {}),
    "fixture-upstream": ("fixture", UPSTREAM, {}),
    "fixture-carry-masks-flex-interpolate": (
        "fixture",
        CARRY,
        {"nested_masks": True, "flex_padding": True, "interpolate_pos": True},
    ),
    "example-carry": ("example", CARRY, {}),
    "example-upstream": ("example", UPSTREAM, {}),
}
IN_PROCESS_DIGESTS = {
    "fixture-carry": "0d80b23b620d1f315ed12c103b3958eb95ee09069786dcd525ef709ff7db6d5a",
    "fixture-upstream": "fabf8bee86f964528d9875058a64964b9936fa2178ad9e86a8bad2c73edae52b",
    "fixture-carry-masks-flex-interpolate": "c399e89da47c90ef54be337f30fcf1c5e6a77a539e7fc01c5dfac9cb45104177",
    "example-carry": "45ca95dc1afa8343190293b439ad425fdcaaae068f668dc3af5533f104b9317a",
    "example-upstream": "ecd53749519b2b9ca5ce61572d7915ea7241c7bffaee4219d7e12f9ad3893ac5",
}


def _as_model_sees_it(batch: dict[str, Any]) -> dict[str, Any]:
    """A ``pixels_as_bytes`` pack normalised as the trainer does it; the bytes must have been uint8."""
    assert all(batch[k].dtype == torch.uint8 for k in ("padded_pixels", "packed_vit_pixels") if k in batch)
    return normalise_pixels(batch)


@pytest.mark.parametrize("as_bytes", [False, True], ids=["float32", "bytes"])
@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_in_process_packs_are_unchanged(sources, name, as_bytes):
    """Also when images travel as bytes and are normalised by the consumer (``normalise_pixels``)."""
    data, params, kwargs = IN_PROCESS[name]
    fx, m0, _ = sources[data]
    batches = list(itertools.islice(iter(_dataset(fx, m0, params, pixels_as_bytes=as_bytes, **kwargs)), PACKS))
    assert len(batches) == PACKS
    if as_bytes:
        assert any("padded_pixels" in b for b in batches) and any("packed_vit_pixels" in b for b in batches)
        batches = [_as_model_sees_it(b) for b in batches]
    assert packs_digest(batches) == IN_PROCESS_DIGESTS[name]


TWO_WORKER_DIGESTS = {
    "fixture-carry": "00c393bff11eaf16ffa28ae0ac1d5145d973429e5b91a4e73455fc63e0b56939",
    "fixture-upstream": "d5195de24748a8eaf50d39e385b5e7c6e958c42c78e9f1c96038486f2c8dccd0",
    "example-carry": "cf7694b6814ac2b1141761c106bf163f048e96aee885d2e2fa0780a759834868",
}


@pytest.mark.parametrize(
    "name,as_bytes", [(name, False) for name in sorted(TWO_WORKER_DIGESTS)] + [("example-carry", True)]
)
def test_two_dataloader_worker_packs_are_unchanged(sources, name, as_bytes):
    """Both forked workers' streams (worker 1's units, seeds and RNG differ from worker 0's); the bytes through
    shared memory too."""
    data, mode = name.split("-")
    fx, _, m2 = sources[data]
    ds = _dataset(fx, m2, CARRY if mode == "carry" else UPSTREAM, num_workers=2, pixels_as_bytes=as_bytes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=collate_packed)
        batches = list(itertools.islice(iter(loader), PACKS))
    assert [b["data_state"]["worker_id"] for b in batches] == [0, 1] * (PACKS // 2)
    if as_bytes:
        batches = [_as_model_sees_it(b) for b in batches]
    assert packs_digest(batches) == TWO_WORKER_DIGESTS[name]


# ---- the pixel kernels behind the pins, value by value ---------------------------------------------
MEAN_STD = [
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.2757771)),
]


def _every_byte_image(width: int, height: int) -> Image.Image:
    """An RGB image whose channels each take all 256 byte values (and more, at odd sizes)."""
    values = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3)
    values = (values * np.array([1, 7, 101]) + values // 256) % 256
    return Image.fromarray(values.astype(np.uint8), "RGB")


def _plain_normalise(image, mean, std) -> torch.Tensor:
    """The loader's original normalisation (before issue #13.4), kept here as the reference."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("mean,std", MEAN_STD)
def test_normalise_is_bit_identical_to_the_plain_formula(mean, std):
    transform = ImageTransform(1024, 16, 14, image_mean=mean, image_std=std)
    for width, height in ((64, 48), (53, 37), (70, 98)):
        image = _every_byte_image(width, height)
        assert _same_bits(transform.normalise(image), _plain_normalise(image, mean, std))
        assert _same_bits(transform(image), _plain_normalise(transform.resize(image), mean, std))
        batch = torch.full((2, 3, height + 5, width + 3), 7, dtype=torch.uint8)  # into a corner of a padded batch
        transform.bytes_into(image, batch[1, :, :height, :width])
        assert torch.equal(batch[1, :, :height, :width], torch.from_numpy(np.array(image)).permute(2, 0, 1))
        assert bool((batch[1, :, height:] == 7).all() and (batch[0] == 7).all())


@pytest.mark.parametrize("mean,std", MEAN_STD)
def test_patch_bytes_normalised_are_patchify_of_the_plain_formula(mean, std):
    transform = ImageTransform(1024, 16, 14, image_mean=mean, image_std=std)
    image = _every_byte_image(70, 98)
    rows = (98 // 14) * (70 // 14)
    out = torch.zeros(rows + 3, 14 * 14 * 3, dtype=torch.uint8)
    transform.patch_bytes_into(image, 14, out[2:-1])
    assert not out[:2].any() and not out[-1].any()
    tokens = normalise_bytes(out[2:-1].view(-1, 3), mean, std, torch.empty(rows * 14 * 14, 3), 1)
    assert _same_bits(tokens.view(rows, -1), patchify(_plain_normalise(image, mean, std), 14))


@pytest.mark.parametrize("mean,std", MEAN_STD)
def test_byte_normalisation_gives_the_plain_formula_on_any_layout(mean, std):
    """Both kernels give the plain formula's bits: the CPU arithmetic and the table gather a GPU runs (here on
    CPU tensors), channels first or last, into strided outputs."""
    image = _every_byte_image(70, 98)
    planes = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W] bytes, strided
    reference = _plain_normalise(image, mean, std)
    kernels = {
        "cpu": lambda data, out, dim: normalise_bytes(data, mean, std, out, dim),
        "gather": lambda data, out, dim: gather_bytes(data, byte_lut(mean, std), out, dim),
    }
    for name, kernel in kernels.items():
        assert _same_bits(kernel(planes, torch.empty(3, 98, 70), 0), reference), name
        last = kernel(planes.permute(1, 2, 0), torch.empty(98, 70, 3), 2)
        assert _same_bits(last, reference.permute(1, 2, 0)), name
