"""``bagel data index``: outputs, summary table, exit status."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_index_fixtures import good_t2i, image_bytes, registry_for, write_t2i

from bagel_core.config.registry import Registry
from bagel_core.index.cli import add_parser


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bagel data")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_outputs_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "t2i"
    good_t2i(d / "chunk_0.parquet", n=4)
    write_t2i(d / "chunk_1.parquet", [image_bytes(), b""], ['{"a": "b"}', "not json"])
    reg_path = registry_for(t2i={"data_dir": d}).save(tmp_path / "registry.yaml")
    out = tmp_path / "out"
    rc = _main(["index", "--registry", str(reg_path), "--out", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    assert (out / "index.parquet").is_file() and (out / "quarantine.parquet").is_file()
    # the registry is updated in place, its parquet_info generated beside it; no second registry
    assert (tmp_path / "parquet_info" / "t2i.json").is_file() and not (out / "dataset_info.yaml").exists()
    assert Registry.load(reg_path).by_name("t2i").num_total_samples == 6
    assert pq.read_table(out / "index.parquet").num_rows == 6
    assert pq.read_table(out / "quarantine.parquet").column("reason").to_pylist() == ["image_empty"]
    assert "t2i_pretrain/t2i" in captured.out and "image_empty=1" in captured.out
    assert "indexing" in captured.err  # progress bar
    # ratio 1/6 > 10 %: exit 1 with a message naming the dataset
    rc = _main(
        [
            "index",
            "--registry",
            str(reg_path),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
            "--max-quarantine-ratio",
            "0.1",
        ]
    )
    assert rc == 1
    assert "t2i_pretrain/t2i: quarantine ratio 16.67% exceeds 10.00%" in capsys.readouterr().err
