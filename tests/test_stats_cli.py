"""``bagel data stats`` / ``bagel data plan`` command lines: outputs, tables, clear errors."""

from __future__ import annotations

import argparse
import json

import polars as pl
import pytest
from stats_fixtures import write_fixture

from bagel_core import cli
from bagel_core.plan import cli as plan_cli
from bagel_core.stats import cli as stats_cli


def main(argv: list[str]) -> int:
    return cli.main(["data", *argv])


def add_parser(subparsers) -> None:
    stats_cli.add_parser(subparsers)
    plan_cli.add_parser(subparsers)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("cli"), t2i_files=2, edit_files=2, vlm_copies=2)


def _args(fx, out) -> list[str]:
    return [
        "--registry",
        str(fx.registry),
        "--dataset-config",
        str(fx.groups),
        "--index",
        str(fx.index_dir),
        "--out",
        str(out),
    ]


def test_add_parser_registers_both_commands():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "plan",
            "--registry",
            "r",
            "--dataset-config",
            "g",
            "--index",
            "i",
            "--out",
            "o",
            "--world-size",
            "8",
            "--num-workers",
            "4",
            "--seed",
            "3",
        ]
    )
    assert (args.world_size, args.num_workers, args.seed, args.max_num_tokens) == (8, 4, 3, 36_864)
    assert callable(args.func)
    assert callable(
        parser.parse_args(["stats", "--registry", "r", "--dataset-config", "g", "--index", "i", "--out", "o"]).func
    )


def test_stats_command_writes_files_and_lists_violations(fx, tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["stats", *_args(fx, out), "--max-num-tokens-per-sample", "9000"]) == 0
    printed = capsys.readouterr().out
    assert "total_tokens" in printed and "over max_num_tokens_per_sample 9000" in printed
    stats = pl.read_parquet(out / "token_stats.parquet")
    assert {"dataset", "source_file", "row_index", "text_tokens", "vit_tokens", "vae_tokens", "total_tokens"} <= set(
        stats.columns
    )
    summary = json.loads((out / "token_stats_summary.json").read_text())
    assert summary["over_cap"] == int(stats["over_cap"].sum()) > 0
    assert summary["skipped_reasons"]  # the VLM line without a gpt turn
    assert (out / "token_stats_skipped.parquet").is_file() and (out / "token_stats_summary.parquet").is_file()


def test_plan_command_prints_manifest_and_simulation(fx, tmp_path, capsys):
    out = tmp_path / "plan"
    assert (
        main(
            [
                "plan",
                *_args(fx, out),
                "--world-size",
                "1",
                "--num-workers",
                "2",
                "--expected-num-tokens",
                "10240",
                "--max-num-tokens",
                "11520",
                "--max-num-tokens-per-sample",
                "10240",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "packs per epoch" in printed and "token share" in printed
    report = json.loads((out / "packing_simulation.json").read_text())
    assert report["packs"] > 0 and report["params"]["max_num_tokens"] == 11520
    assert (out / "manifest.parquet").is_file() and (out / "token_stats.parquet").is_file()


def test_plan_records_the_packing_mode_and_carries_the_quarantine(fx, tmp_path, capsys):
    out = tmp_path / "plan"
    args = [*_args(fx, out), "--world-size", "1", "--num-workers", "1", "--packing", "upstream"]
    assert main(["plan", *args]) == 0
    printed = capsys.readouterr().out
    assert "packing simulation (--packing upstream;" in printed and "trained n" in printed
    assert "quarantined in the index (skipped unread by training): 1 (image_corrupt 1)" in printed
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["packing"] == "upstream" and meta["quarantine"]["samples"] == 1
    assert (out / "quarantine.parquet").is_file()
    report = json.loads((out / "packing_simulation.json").read_text())
    assert report["mode"] == report["params"]["mode"] == "upstream"
    fates = {"drawn", "packed", "skipped_over_cap", "discarded_on_flush", "unfit", "carried", "pending"}
    for g in report["group_share"]:
        assert {"weight_share", "drawn_share", "trained_share", *fates} <= set(g)
    assert main(["plan", *args[:-1], "carry", "--stats", str(out)]) == 0
    assert json.loads((out / "packing_simulation.json").read_text())["discarded_on_overflow"] == 0


def test_errors_name_the_problem(fx, tmp_path, capsys):
    assert (
        main(
            [
                "stats",
                "--registry",
                str(fx.registry),
                "--dataset-config",
                str(fx.groups),
                "--index",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "no index found" in capsys.readouterr().err
    assert main(["plan", *_args(fx, tmp_path / "p"), "--world-size", "3", "--num-workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "t2i_pretrain: 2 files for world_size 3 x num_workers 1 = 3 readers" in err and "Fix:" in err
