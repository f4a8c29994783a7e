"""Build a registry and a dataset-group YAML from an extracted data folder.

This replaces upstream's "edit every ``your_data_path`` by hand" step: the folder layout of the
official ``bagel_example`` (``t2i/``, ``editing/<name>/`` + ``editing/parquet_info/``,
``vlm/*.jsonl`` + ``vlm/images/``) is scanned, sizes come from parquet footers and line counts, and
``parquet_info`` keys are rewritten to the real paths (or generated from footers when absent).
"""

from __future__ import annotations

import json
from pathlib import Path

from bagel_core.config.dataset_config import DatasetConfig, FrameSamplerArgs, GroupConfig
from bagel_core.config.errors import ConfigError
from bagel_core.config.files import read_json
from bagel_core.config.image_args import ImageTransformArgs
from bagel_core.config.registry import DatasetEntry, Registry
from bagel_core.config.validate import count_jsonl_lines, parquet_footer_counts

#: Upstream's registry names for the official example files.
OFFICIAL_NAMES = {"llava_ov_si": "llava_ov"}

#: Transform settings of upstream ``example.yaml`` (data-format.md 3.1).
T2I_VAE_TRANSFORM = ImageTransformArgs(max_image_size=1024, min_image_size=512, image_stride=16)
EDIT_VIT_TRANSFORM = ImageTransformArgs(max_image_size=518, min_image_size=224, image_stride=14)
VLM_VIT_TRANSFORM = ImageTransformArgs(max_image_size=980, min_image_size=378, image_stride=14, max_pixels=2_007_040)


def find_example_root(path: str | Path) -> Path:
    """Accept either the ``bagel_example`` folder itself or the folder it was extracted into."""
    path = Path(path).expanduser().resolve()
    if (path / "bagel_example").is_dir():
        path = path / "bagel_example"
    if not any((path / sub).is_dir() for sub in ("t2i", "editing", "vlm")):
        raise ConfigError(
            f"{path}: no t2i/, editing/ or vlm/ folder found; point --root at the extracted bagel_example folder"
        )
    return path


def parquet_info_from_footers(data_dir: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    """Upstream ``parquet_info`` (keys: ``data_dir/filename`` exactly as the loader joins them)."""
    import pyarrow.parquet as pq

    def footer(path: Path):
        try:
            return pq.ParquetFile(path).metadata
        except Exception:  # noqa: BLE001 - unreadable: left out (validation warns, the index quarantines it)
            return None

    info: dict[str, dict[str, int]] = {}
    for path in files:
        meta = footer(path)
        if meta is None:
            continue
        info[f"{str(data_dir).rstrip('/')}/{path.name}"] = {
            "num_row_groups": meta.num_row_groups,
            "num_rows": meta.num_rows,
            "num_columns": meta.num_columns,
        }
    return info


def rewrite_parquet_info(upstream_json: Path, data_dir: Path) -> dict[str, dict]:
    """Re-key an upstream parquet_info JSON (placeholder paths) by file name onto ``data_dir``."""
    raw = read_json(upstream_json, "parquet_info", "delete the reference to regenerate it from the files")
    if not isinstance(raw, dict):
        raise ConfigError(f"{upstream_json} must be a JSON object keyed by parquet path")
    return {f"{str(data_dir).rstrip('/')}/{Path(key).name}": value for key, value in raw.items()}


def localize_parquet_info(registry: Registry, parquet_info_dir: str | Path) -> Registry:
    """A copy of ``registry`` whose parquet_info JSONs are re-keyed onto each entry's real ``data_dir``
    and written to ``parquet_info_dir`` (upstream's JSONs carry ``your_data_path`` in their keys)."""
    out_dir = Path(parquet_info_dir).expanduser().resolve()
    entries = []
    for entry in registry.entries:
        if entry.parquet_info_path is not None and entry.data_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            info = rewrite_parquet_info(Path(entry.parquet_info_path), Path(entry.data_dir))
            target = out_dir / f"{entry.name}.json"
            target.write_text(json.dumps(info, indent=2) + "\n")
            entry = DatasetEntry(**{**entry.__dict__, "parquet_info_path": target})
        entries.append(entry)
    return Registry(entries=entries, source=registry.source)


def _parquet_entry(group: str, name: str, data_dir: Path) -> DatasetEntry | None:
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith(".parquet"))
    if not files:
        return None
    rows, _, problems = parquet_footer_counts(files)
    return DatasetEntry(group, name, data_dir, num_files=len(files), num_total_samples=None if problems else rows)


def discover_registry(root: str | Path, parquet_info_dir: str | Path) -> Registry:
    """Registry entries for everything found under the example-layout folder ``root``."""
    root = find_example_root(root)
    info_out = Path(parquet_info_dir).expanduser().resolve()  # written into the registry: must be absolute
    entries: list[DatasetEntry] = []

    t2i = root / "t2i"
    if t2i.is_dir():
        for folder in [t2i] + sorted(p for p in t2i.iterdir() if p.is_dir()):
            entry = _parquet_entry("t2i_pretrain", "t2i" if folder == t2i else folder.name, folder)
            if entry:
                entries.append(entry)

    editing = root / "editing"
    if editing.is_dir():
        for folder in sorted(p for p in editing.iterdir() if p.is_dir() and p.name != "parquet_info"):
            entry = _parquet_entry("unified_edit", folder.name, folder)
            if entry is None:
                continue
            candidates = sorted((editing / "parquet_info").glob(f"{folder.name}*.json"))
            if candidates:
                info = rewrite_parquet_info(candidates[0], folder)
            else:
                info = parquet_info_from_footers(folder, entry.parquet_files())
            info_out.mkdir(parents=True, exist_ok=True)
            info_path = info_out / f"{folder.name}.json"
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            entries.append(DatasetEntry(**{**entry.__dict__, "parquet_info_path": info_path}))

    vlm = root / "vlm"
    if vlm.is_dir():
        image_root = vlm / "images" if (vlm / "images").is_dir() else vlm
        for jsonl in sorted(vlm.glob("*.jsonl")):
            entries.append(
                DatasetEntry(
                    "vlm_sft",
                    OFFICIAL_NAMES.get(jsonl.stem, jsonl.stem),
                    image_root,
                    num_total_samples=count_jsonl_lines(jsonl),
                    jsonl_path=jsonl,
                )
            )
    if not entries:
        raise ConfigError(f"{root}: found no parquet shards or JSONL files in the example layout")
    return Registry(entries=entries)


def default_dataset_config(registry: Registry) -> DatasetConfig:
    """A dataset-group YAML with upstream ``example.yaml``'s settings covering every registered dataset.

    ``num_used_data`` uses every unit once: files for parquet groups, lines for VLM.
    """
    groups: dict[str, GroupConfig] = {}
    for entry in registry.entries:
        used = entry.num_files if entry.is_parquet else entry.num_total_samples
        if used is None:
            raise ConfigError(f"{entry.group}/{entry.name}: size unknown; run `bagel data check` to see why")
        group = groups.get(entry.group)
        if group is None:
            group = GroupConfig(
                group=entry.group,
                dataset_names=[],
                num_used_data=[],
                weight=1.0,
                image_transform_args=VLM_VIT_TRANSFORM if entry.group == "vlm_sft" else T2I_VAE_TRANSFORM,
                is_mandatory=entry.group != "unified_edit",
            )
            if entry.group == "unified_edit":
                group.vit_image_transform_args = EDIT_VIT_TRANSFORM
            if entry.group == "vlm_sft":
                group.frame_sampler_args = FrameSamplerArgs(max_num_frames=12, min_num_frames=8)
                group.shuffle_lines, group.shuffle_seed = True, 0
            groups[entry.group] = group
        group.dataset_names.append(entry.name)
        group.num_used_data.append(used)
    return DatasetConfig(groups=groups)
