"""Small on-disk datasets (T2I + edit parquet, VLM JSONL + images) with a registry, a dataset YAML and an
index in the agreed schema, shared by the token/stats/manifest/packing tests.

The index is built here by opening every image with Pillow (sizes "from the file"), independently of
the project's indexer, so these tests do not depend on it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image


def image_size(source) -> list[int]:
    """[width, height] of an image file or bytes, closing the file."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return list(img.size)


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


T2I_ROWS = [
    # (image size, captions JSON)
    ((1024, 1024), {"short": "a red fox in snow", "long": "A red fox standing in fresh snow at dusk, photographed"}),
    ((640, 480), {"0": "a small blue square on a white background"}),
    ((1920, 1080), {}),
    ((256, 256), {"a": "tiny", "b": "a tiny picture", "c": "a tiny picture of a green circle on grey"}),
]
EDIT_ROWS = [
    # (image sizes, instruction_list)
    ([(1024, 1024), (1024, 1024)], [["make the sky purple", "turn the sky purple"]]),
    ([(512, 512), (640, 480), (512, 512)], [["add a cat"], ["remove the tree", "delete the tree"]]),
    ([(1024, 768), (1024, 768), (1024, 768), (1024, 768)], [["step one"], ["step two"], ["step three"]]),
]
VLM_RECORDS = [
    (
        {
            "id": "a",
            "image": "img_a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the bus?"},
                {"from": "gpt", "value": "It is white and red."},
            ],
        },
        [(1000, 1000)],
    ),
    (
        {
            "id": "b",
            "image": ["img_b0.png", "img_b1.png", "img_b2.png", "img_b3.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."},
                {"from": "gpt", "value": "The first is larger."},
                {"from": "system", "value": "ignored"},
            ],
        },
        [(1000, 1000)] * 4,
    ),
    ({"id": "c", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}]}, []),
    (
        {"id": "d", "image": "img_d.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}]},
        [(640, 480)],
    ),  # no gpt turn -> skipped
]


@dataclass
class Fixture:
    root: Path
    registry: Path
    groups: Path
    index_dir: Path
    t2i_files: list[Path]
    edit_files: list[Path]
    jsonl: Path


def write_fixture(
    root: Path,
    t2i_files: int = 2,
    edit_files: int = 2,
    edit_row_groups: int = 2,
    vlm_copies: int = 1,
    t2i_num_used: int | None = None,
    edit_num_used: int | None = None,
    vlm_num_used: int | None = None,
    quarantine_one: bool = True,
) -> Fixture:
    """Write the datasets, registry, groups YAML and index under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    t2i_dir, edit_dir, vlm_dir = root / "t2i", root / "editing" / "seedx", root / "vlm" / "images"
    for d in (t2i_dir, edit_dir, vlm_dir):
        d.mkdir(parents=True, exist_ok=True)
    index_rows: list[dict] = []

    t2i_paths = []
    for f in range(t2i_files):
        path = t2i_dir / f"chunk_{f}.parquet"
        rows = T2I_ROWS
        table = pa.table(
            {
                "image": pa.array([png(*size) for size, _ in rows], pa.binary()),
                "captions": pa.array([json.dumps(c) for _, c in rows], pa.string()),
            }
        )
        pq.write_table(table, path, row_group_size=2)
        t2i_paths.append(path)
        _index_parquet(index_rows, "t2i", "t2i_pretrain", "t2i", path, "image", single=True)

    edit_paths = []
    info = {}
    for f in range(edit_files):
        path = edit_dir / f"chunk_{f}.parquet"
        rows = EDIT_ROWS * edit_row_groups
        table = pa.table(
            {
                "image_list": pa.array([[png(*s) for s in sizes] for sizes, _ in rows], pa.list_(pa.binary())),
                "instruction_list": pa.array([ins for _, ins in rows], pa.list_(pa.list_(pa.string()))),
            }
        )
        pq.write_table(table, path, row_group_size=len(EDIT_ROWS))
        info[str(path)] = {"num_row_groups": pq.ParquetFile(path).num_row_groups, "num_rows": table.num_rows}
        edit_paths.append(path)
        _index_parquet(index_rows, "seedx", "unified_edit", "edit", path, "image_list", single=False)
    info_path = root / "editing" / "parquet_info.json"
    info_path.write_text(json.dumps(info))

    jsonl = root / "vlm" / "data.jsonl"
    lines = []
    for copy in range(vlm_copies):
        for record, sizes in VLM_RECORDS:
            names = record.get("image")
            names = [names] if isinstance(names, str) else (names or [])
            for name, size in zip(names, sizes):
                if not (vlm_dir / name).exists():
                    Image.new("RGB", size, (10, 120, 10)).save(vlm_dir / name)
            rec = dict(record, id=f"{record['id']}{copy}")
            lines.append(json.dumps(rec))
    jsonl.write_text("\n".join(lines) + "\n")
    for line_no, line in enumerate(lines):
        rec = json.loads(line)
        names = rec.get("image")
        names = [names] if isinstance(names, str) else (names or [])
        sizes = [image_size(vlm_dir / n) for n in names]
        index_rows.append(_row("llava", "vlm_sft", "vlm", jsonl, -1, line_no, line_no, sizes))

    if quarantine_one:
        index_rows[1]["status"] = "quarantined"
        index_rows[1]["reason"] = "image_corrupt"

    index_dir = root / "index"
    index_dir.mkdir(exist_ok=True)
    write_index(index_rows, index_dir / "index.parquet")

    registry = {
        "t2i_pretrain": {"t2i": {"data_dir": str(t2i_dir), "num_files": t2i_files}},
        "unified_edit": {
            "seedx": {"data_dir": str(edit_dir), "num_files": edit_files, "parquet_info_path": str(info_path)}
        },
        "vlm_sft": {"llava": {"data_dir": str(vlm_dir), "jsonl_path": str(jsonl)}},
    }
    registry_path = root / "dataset_info.yaml"
    registry_path.write_text(yaml.safe_dump(registry, sort_keys=False))
    groups = {
        "t2i_pretrain": {
            "dataset_names": ["t2i"],
            "image_transform_args": {"image_stride": 16, "max_image_size": 1024, "min_image_size": 512},
            "is_mandatory": True,
            "num_used_data": [t2i_num_used or t2i_files],
            "weight": 1,
        },
        "unified_edit": {
            "dataset_names": ["seedx"],
            "image_transform_args": {"image_stride": 16, "max_image_size": 1024, "min_image_size": 512},
            "vit_image_transform_args": {"image_stride": 14, "max_image_size": 518, "min_image_size": 224},
            "is_mandatory": False,
            "num_used_data": [edit_num_used or edit_files],
            "weight": 1,
        },
        "vlm_sft": {
            "dataset_names": ["llava"],
            "image_transform_args": {
                "image_stride": 14,
                "max_image_size": 980,
                "min_image_size": 378,
                "max_pixels": 2007040,
            },
            "frame_sampler_args": {"max_num_frames": 12, "min_num_frames": 8},
            "is_mandatory": True,
            "shuffle_lines": True,
            "shuffle_seed": 0,
            "num_used_data": [vlm_num_used or len(lines)],
            "weight": 1,
        },
    }
    groups_path = root / "groups.yaml"
    groups_path.write_text(yaml.safe_dump(groups, sort_keys=False))
    return Fixture(root, registry_path, groups_path, index_dir, t2i_paths, edit_paths, jsonl)


def _row(dataset, group, task, path, rg, row, file_row, sizes, status="ok", reason=None) -> dict:
    return {
        "dataset": dataset,
        "group": group,
        "task": task,
        "source_file": str(path),
        "row_group": rg,
        "row_index": row,
        "file_row": file_row,
        "image_sizes": sizes,
        "num_images": len(sizes),
        "status": status,
        "reason": reason,
    }


def _index_parquet(out: list[dict], dataset, group, task, path: Path, column: str, single: bool) -> None:
    pf = pq.ParquetFile(path)
    file_row = 0
    for rg in range(pf.num_row_groups):
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        for row, value in enumerate(values):
            images = [value] if single else value
            sizes = [image_size(b) for b in images]
            out.append(_row(dataset, group, task, path, rg, row, file_row, sizes))
            file_row += 1


def write_index(rows: list[dict], path: Path) -> None:
    schema = pa.schema(
        [
            ("dataset", pa.string()),
            ("group", pa.string()),
            ("task", pa.string()),
            ("source_file", pa.string()),
            ("row_group", pa.int32()),
            ("row_index", pa.int64()),
            ("file_row", pa.int64()),
            ("image_sizes", pa.list_(pa.list_(pa.int32()))),
            ("num_images", pa.int32()),
            ("status", pa.string()),
            ("reason", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
