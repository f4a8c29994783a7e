"""The dataset-group YAML (upstream ``data/configs/example.yaml``), parsed and checked up front.

Upstream passes unknown keys straight into a dataset constructor and crashes at start-up with a
``TypeError``; here every key is known per group, and a wrong one is reported with its path and the
list of allowed keys before any process starts. YAML is read with PyYAML (YAML 1.1), so
``2_007_040`` is an integer as upstream expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bagel_core.config.errors import ConfigError
from bagel_core.config.files import read_yaml
from bagel_core.config.image_args import DEFAULT_MAX_PIXELS, ImageTransformArgs
from bagel_core.config.registry import GROUP_TASKS, Registry

#: Keys the packer consumes (data-format.md 3.2) plus constructor keys (3.3), per group.
_COMMON_KEYS = {
    "dataset_names",
    "is_mandatory",
    "weight",
    "image_transform_args",
    "resume_data_status",
    "num_used_data",
}
ALLOWED_KEYS: dict[str, set[str]] = {
    "t2i_pretrain": _COMMON_KEYS,
    "unified_edit": _COMMON_KEYS | {"vit_image_transform_args"},
    "vlm_sft": _COMMON_KEYS | {"frame_sampler_args", "shuffle_lines", "shuffle_seed"},
}
_TRANSFORM_KEYS = {"max_image_size", "min_image_size", "image_stride", "max_pixels", "image_mean", "image_std"}
_FRAME_KEYS = {"max_num_frames", "min_num_frames", "sample"}


@dataclass(frozen=True)
class FrameSamplerArgs:
    max_num_frames: int = -1
    min_num_frames: int = 8
    sample: str = "rand"


@dataclass
class GroupConfig:
    """One top-level group of the dataset YAML."""

    group: str
    dataset_names: list[str]
    num_used_data: list[int]
    image_transform_args: ImageTransformArgs
    weight: float = 0.0
    is_mandatory: bool = False
    vit_image_transform_args: ImageTransformArgs | None = None
    frame_sampler_args: FrameSamplerArgs | None = None
    shuffle_lines: bool = False
    shuffle_seed: int = 0
    resume_data_status: bool = True

    @property
    def task(self) -> str:
        return GROUP_TASKS[self.group]

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset_names": list(self.dataset_names),
            "image_transform_args": _transform_to_dict(self.image_transform_args),
        }
        if self.vit_image_transform_args is not None:
            out["vit_image_transform_args"] = _transform_to_dict(self.vit_image_transform_args)
        if self.frame_sampler_args is not None:
            out["frame_sampler_args"] = {
                "max_num_frames": self.frame_sampler_args.max_num_frames,
                "min_num_frames": self.frame_sampler_args.min_num_frames,
            }
        out["is_mandatory"] = self.is_mandatory
        if self.group == "vlm_sft":
            out["shuffle_lines"] = self.shuffle_lines
            out["shuffle_seed"] = self.shuffle_seed
        out["num_used_data"] = list(self.num_used_data)
        out["weight"] = self.weight
        if not self.resume_data_status:
            out["resume_data_status"] = False
        return out


@dataclass
class DatasetConfig:
    """All groups, in YAML order (the order matters for sampling and mandatory fill)."""

    groups: dict[str, GroupConfig] = field(default_factory=dict)
    source: Path | None = None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {name: group.to_yaml_dict() for name, group in self.groups.items()}
        path.write_text(
            "# BAGEL dataset-group config (upstream example.yaml schema). Written by bagel-pipeline.\n"
            "# num_used_data: files for t2i/edit, lines for vlm; every group needs at least\n"
            "# world_size x num_workers units or a worker gets no data.\n" + yaml.safe_dump(body, sort_keys=False)
        )
        return path

    def check_against(self, registry: Registry) -> None:
        """Every ``dataset_names`` entry must be registered under its group."""
        for group in self.groups.values():
            for name in group.dataset_names:
                registry.get(group.group, name)


def _transform_to_dict(args: ImageTransformArgs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image_stride": args.image_stride,
        "max_image_size": args.max_image_size,
        "min_image_size": args.min_image_size,
    }
    if args.max_pixels != DEFAULT_MAX_PIXELS:
        out["max_pixels"] = args.max_pixels
    return out


def _require_int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value}")
    return value


def _parse_transform(raw: Any, where: str) -> ImageTransformArgs:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with max_image_size, min_image_size and image_stride")
    unknown = sorted(set(raw) - _TRANSFORM_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TRANSFORM_KEYS)}")
    for key in ("max_image_size", "min_image_size", "image_stride"):
        if key not in raw:
            raise ConfigError(f"{where}: missing '{key}'")
    kwargs: dict[str, Any] = {
        key: _require_int(raw[key], f"{where}.{key}", 1)
        for key in ("max_image_size", "min_image_size", "image_stride", "max_pixels")
        if key in raw
    }
    for key in ("image_mean", "image_std"):
        if key in raw:
            value = raw[key]
            if not (isinstance(value, list) and len(value) == 3):
                raise ConfigError(f"{where}.{key} must be a list of 3 numbers")
            kwargs[key] = tuple(float(v) for v in value)
    return ImageTransformArgs(**kwargs)


def _parse_group(group: str, raw: Any, where: str) -> GroupConfig:
    if group not in ALLOWED_KEYS:
        raise ConfigError(f"{where}: unknown group '{group}'; known groups: {', '.join(ALLOWED_KEYS)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: group '{group}' must be a mapping")
    path = f"{where}: {group}"
    unknown = sorted(set(raw) - ALLOWED_KEYS[group])
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown} (upstream would crash with 'unexpected keyword argument'); "
            f"allowed keys for {group}: {sorted(ALLOWED_KEYS[group])}"
        )
    names = raw.get("dataset_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}.dataset_names must be a non-empty list of dataset names")
    used = raw.get("num_used_data")
    if not isinstance(used, list) or len(used) != len(names):
        raise ConfigError(
            f"{path}.num_used_data must be a list with one count per dataset name ({len(names)}), got {used!r}"
        )
    used = [_require_int(v, f"{path}.num_used_data[{i}]", 1) for i, v in enumerate(used)]
    if "image_transform_args" not in raw:
        raise ConfigError(f"{path}: missing 'image_transform_args' (the dataset class needs a transform)")
    weight = raw.get("weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"{path}.weight must be a non-negative number, got {weight!r}")
    config = GroupConfig(
        group=group,
        dataset_names=list(names),
        num_used_data=used,
        image_transform_args=_parse_transform(raw["image_transform_args"], f"{path}.image_transform_args"),
        weight=float(weight),
        is_mandatory=_parse_bool(raw.get("is_mandatory", False), f"{path}.is_mandatory"),
        resume_data_status=_parse_bool(raw.get("resume_data_status", True), f"{path}.resume_data_status"),
    )
    if group == "unified_edit":
        if "vit_image_transform_args" not in raw:
            raise ConfigError(f"{path}: missing 'vit_image_transform_args' (required for unified_edit)")
        config.vit_image_transform_args = _parse_transform(
            raw["vit_image_transform_args"], f"{path}.vit_image_transform_args"
        )
    if group == "vlm_sft":
        frames = raw.get("frame_sampler_args")
        if not isinstance(frames, dict):
            raise ConfigError(f"{path}: missing 'frame_sampler_args' mapping (required for vlm_sft)")
        unknown = sorted(set(frames) - _FRAME_KEYS)
        if unknown:
            raise ConfigError(f"{path}.frame_sampler_args: unknown key(s) {unknown}; allowed: {sorted(_FRAME_KEYS)}")
        config.frame_sampler_args = FrameSamplerArgs(
            max_num_frames=_require_int(frames.get("max_num_frames", -1), f"{path}.frame_sampler_args.max_num_frames"),
            min_num_frames=_require_int(frames.get("min_num_frames", 8), f"{path}.frame_sampler_args.min_num_frames"),
            sample=str(frames.get("sample", "rand")),
        )
        config.shuffle_lines = _parse_bool(raw.get("shuffle_lines", False), f"{path}.shuffle_lines")
        config.shuffle_seed = _require_int(raw.get("shuffle_seed", 0), f"{path}.shuffle_seed")
    return config


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def parse_dataset_config(data: Any, source: Path | None = None) -> DatasetConfig:
    where = str(source) if source else "<dataset config>"
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping of group name -> group settings")
    groups = {str(name): _parse_group(str(name), raw, where) for name, raw in data.items()}
    if sum(g.weight for g in groups.values()) <= 0:
        raise ConfigError(f"{where}: the sum of group weights must be > 0 (set 'weight' on at least one group)")
    return DatasetConfig(groups=groups, source=source)


def load_dataset_config(path: str | Path) -> DatasetConfig:
    data = read_yaml(path, "dataset config", "create one with `bagel data registry --groups-out`")
    return parse_dataset_config(data, source=Path(path))
