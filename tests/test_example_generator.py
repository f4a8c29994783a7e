"""The built-in example matches the official bagel_example layout, formats and content rules."""

import io
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

SMALL = ExampleConfig(
    t2i_files=3,
    t2i_rows_per_file=4,
    t2i_rows_per_row_group=2,
    edit_files=2,
    edit_row_groups_per_file=2,
    edit_rows_per_row_group=3,
    vlm_lines=30,
)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_dataset(tmp_path_factory.mktemp("gen"), SMALL)


def test_layout_matches_official(example):
    assert example.name == "bagel_example"
    assert sorted(p.name for p in (example / "t2i").iterdir()) == [f"chunk_{i}.parquet" for i in range(3)]
    assert sorted(p.name for p in (example / "editing" / "seedxedit_multi").iterdir()) == [
        "chunk_0.parquet",
        "chunk_1.parquet",
    ]
    assert (example / "editing" / "parquet_info" / "seedxedit_multi_nas.json").is_file()
    assert (example / "vlm" / "llava_ov_si.jsonl").is_file()
    assert any((example / "vlm" / "images").iterdir())


def test_t2i_columns_types_and_captions(example):
    table = pq.read_table(example / "t2i" / "chunk_0.parquet")
    assert table.schema.field("image").type == pa.binary()
    assert table.schema.field("captions").type == pa.string()
    assert pq.ParquetFile(example / "t2i" / "chunk_0.parquet").metadata.num_row_groups == 2
    for raw, caps in zip(table.column("image").to_pylist(), table.column("captions").to_pylist()):
        parsed = json.loads(caps)
        assert isinstance(parsed, dict) and parsed and all(isinstance(v, str) and v for v in parsed.values())
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            assert image.width >= 64 and image.height >= 64
    con = duckdb.connect()
    rows = con.sql(
        f"SELECT count(*), min(octet_length(image)), count(DISTINCT captions) "
        f"FROM read_parquet('{example}/t2i/*.parquet')"
    ).fetchall()
    assert rows[0][0] == SMALL.t2i_samples and rows[0][1] > 100 and rows[0][2] > 1
    described = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{example}/t2i/*.parquet')").fetchall()
    types = {row[0]: row[1] for row in described}
    assert types == {"image": "BLOB", "captions": "VARCHAR"}


def test_editing_rows_and_parquet_info(example):
    path = example / "editing" / "seedxedit_multi" / "chunk_1.parquet"
    table = pq.read_table(path)
    assert table.schema.field("image_list").type == pa.list_(pa.binary())
    assert table.schema.field("instruction_list").type == pa.list_(pa.list_(pa.string()))
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    lengths = set()
    for images, instructions in zip(
        table.column("image_list").to_pylist(), table.column("instruction_list").to_pylist()
    ):
        assert len(images) >= 2 and len(instructions) == len(images) - 1
        assert all(len(alts) == 2 for alts in instructions)
        sizes = {Image.open(io.BytesIO(b)).size for b in images}
        assert len(sizes) == 1  # one scene edited in place keeps its size
        lengths.add(len(images))
    info = json.loads((example / "editing" / "parquet_info" / "seedxedit_multi_nas.json").read_text())
    key = "your_data_path/bagel_example/editing/seedxedit_multi/chunk_1.parquet"
    assert info[key] == {"num_row_groups": 2, "num_rows": 6, "num_columns": 2}
    count = (
        duckdb.connect()
        .sql(f"SELECT count(*) FROM read_parquet('{example}/editing/seedxedit_multi/*.parquet')")
        .fetchall()[0][0]
    )
    assert count == SMALL.edit_samples


def test_vlm_jsonl_parses_and_images_exist(example):
    lines = (example / "vlm" / "llava_ov_si.jsonl").read_text().splitlines()
    assert len(lines) == SMALL.vlm_lines
    kinds = set()
    for line in lines:
        record = json.loads(line)
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        for name in images:
            assert (example / "vlm" / "images" / name).is_file()
        placeholders = sum(turn["value"].count("<image>") for turn in record["conversations"])
        assert placeholders == len(images)
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles[::2] == ["human"] * (len(roles) // 2) and roles[1::2] == ["gpt"] * (len(roles) // 2)
        kinds.add((len(images), len(roles) // 2 > 1))
    assert {n for n, _ in kinds} >= {1, 2}  # single- and multi-image samples
    assert any(multi for _, multi in kinds)  # multi-turn conversations
    rows = (
        duckdb.connect().sql(f"SELECT count(*) FROM read_json_auto('{example}/vlm/llava_ov_si.jsonl')").fetchall()[0][0]
    )
    assert rows == SMALL.vlm_lines


def test_generation_is_deterministic(tmp_path):
    first = write_example_dataset(tmp_path / "a", SMALL)
    second = write_example_dataset(tmp_path / "b", SMALL)
    files_a = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files_a)
    other = write_example_dataset(tmp_path / "c", ExampleConfig(**{**SMALL.__dict__, "seed": 1}))
    assert (other / "t2i" / "chunk_0.parquet").read_bytes() != (first / "t2i" / "chunk_0.parquet").read_bytes()


def test_images_vary_in_size_and_aspect(example):
    sizes = set()
    for path in (example / "vlm" / "images").iterdir():
        with Image.open(path) as image:
            sizes.add(image.size)
    assert len(sizes) >= 4
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes) and any(w == h for w, h in sizes)
