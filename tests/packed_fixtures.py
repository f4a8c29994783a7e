"""Shared setup of the packed-dataset tests: the stats fixture data with small transforms, a manifest.

The fixture images (up to 1920x1080) are resized to at most 64 px (VAE) / 56 px (ViT), so a sample
costs tens of tokens and a pack about 130-200: fast on CPU, while every plan kind, the multi-image
pixel budget of VLM records (4 images share ``max_pixels``) and both resize directions occur.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from stats_fixtures import Fixture, write_fixture

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.plan.manifest import build_manifest, write_manifest
from bagel_core.plan.packing import CfgDropout, PackingParams

SMALL_VAE = {"image_stride": 16, "max_image_size": 64, "min_image_size": 32}
SMALL_EDIT_VIT = {"image_stride": 14, "max_image_size": 56, "min_image_size": 28}
SMALL_VLM_VIT = {"image_stride": 14, "max_image_size": 56, "min_image_size": 28, "max_pixels": 6272}
SMALL_PARAMS = PackingParams(
    expected_num_tokens=128,
    max_num_tokens=192,
    max_num_tokens_per_sample=160,
    prefer_buffer_before=96,
    max_buffer_size=4,
)
NO_DROPOUT = CfgDropout(0.0, 0.0, 0.0)


def small_fixture(root: Path, **kwargs) -> Fixture:
    """``write_fixture`` with the groups YAML rewritten to small transforms (same registry and index)."""
    fx = write_fixture(root, **kwargs)
    groups = yaml.safe_load(fx.groups.read_text())
    groups["t2i_pretrain"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["vit_image_transform_args"] = dict(SMALL_EDIT_VIT)
    groups["vlm_sft"]["image_transform_args"] = dict(SMALL_VLM_VIT)
    fx.groups.write_text(yaml.safe_dump(groups, sort_keys=False))
    return fx


def make_manifest(fx: Fixture, out: Path, world_size: int = 1, num_workers: int = 0, seed: int = 42) -> Path:
    config = load_dataset_config(fx.groups)
    registry = Registry.load(fx.registry)
    write_manifest(build_manifest(config, registry, world_size, num_workers, seed=seed), out)
    return out


def make_dataset(fx: Fixture, manifest: Path, groups: Path | None = None, **kwargs):
    """A :class:`PackedDataset` over the fixture (``groups``: another groups YAML for the same data)."""
    from bagel_core.loader.packed_dataset import PackedDataset

    kwargs.setdefault("params", SMALL_PARAMS)
    config = load_dataset_config(groups or fx.groups)
    return PackedDataset(config, Registry.load(fx.registry), manifest, **kwargs)
