"""The `bagel` command line: download -> registry -> check on the built-in example."""

import subprocess
import sys
from pathlib import Path

import yaml

from bagel_core.cli import main


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "bagel_core.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("example", "data"):
        assert command in out
    data_help = subprocess.run(
        [sys.executable, "-m", "bagel_core.cli", "data", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("download", "registry", "check"):
        assert command in data_help


def test_download_registry_check(tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "download",
                "--source",
                "builtin",
                "--out",
                str(out),
                "--t2i-files",
                "2",
                "--vlm-lines",
                "5",
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "bagel_example.zip").is_file() and (out / "bagel_example" / "t2i" / "chunk_1.parquet").is_file()
    printed = capsys.readouterr().out
    assert "t2i" in printed and "vlm" in printed and "sha256" in printed

    registry, groups = tmp_path / "reg" / "dataset_info.yaml", tmp_path / "reg" / "example.yaml"
    assert (
        main(
            [
                "data",
                "registry",
                "--root",
                str(out / "bagel_example"),
                "--out",
                str(registry),
                "--groups-out",
                str(groups),
            ]
        )
        == 0
    )
    body = yaml.safe_load(registry.read_text())
    assert body["t2i_pretrain"]["t2i"]["num_files"] == 2
    assert Path(body["unified_edit"]["seedxedit_multi"]["parquet_info_path"]).is_file()
    assert yaml.safe_load(groups.read_text())["vlm_sft"]["num_used_data"] == [5]

    assert main(["data", "check", "--registry", str(registry), "--dataset-config", str(groups)]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def test_check_reports_placeholder_and_exits_nonzero(tmp_path, capsys):
    registry = tmp_path / "dataset_info.yaml"
    registry.write_text(yaml.safe_dump({"t2i_pretrain": {"t2i": {"data_dir": "your_data_path/bagel_example/t2i"}}}))
    assert main(["data", "check", "--registry", str(registry)]) == 1
    out = capsys.readouterr().out
    assert "ERROR: t2i_pretrain/t2i.data_dir: still contains the 'your_data_path' placeholder" in out


def test_config_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["data", "check", "--registry", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_relative_paths_resolve_to_the_same_files(tmp_path, monkeypatch, capsys):
    """Relative --out/--root (as in the README) must give a registry that validates from anywhere."""
    monkeypatch.chdir(tmp_path)
    assert main(["data", "download", "--out", "d", "--t2i-files", "2", "--vlm-lines", "4", "--quiet"]) == 0
    assert main(["data", "registry", "--root", "d/bagel_example", "--out", "d/reg/dataset_info.yaml"]) == 0
    body = yaml.safe_load((tmp_path / "d/reg/dataset_info.yaml").read_text())
    info = Path(body["unified_edit"]["seedxedit_multi"]["parquet_info_path"])
    assert info.is_absolute() and info.is_file()
    monkeypatch.chdir(tmp_path / "d")
    assert main(["data", "check", "--registry", "reg/dataset_info.yaml"]) == 0


def test_example_summary_reads_the_event_stream_and_the_workspace(tmp_path):
    import json

    from bagel_core.cli import example_summary, step_times

    log = tmp_path / "job.log"
    log.write_text(
        '... - example_zip - STEP_SUCCESS - Finished execution of step "example_zip" in 662ms.\n'
        '... - token_stats - STEP_SUCCESS - Finished execution of step "token_stats" in 3.21s.\n'
        '... - training_run - STEP_SUCCESS - Finished execution of step "training_run" in 1m40s.\n'
        '... - vae_latents - STEP_SUCCESS - Finished execution of step "vae_latents" in 1h2m.\n'
        '... - inference_smoke - STEP_FAILURE - Execution of step "inference_smoke" failed.\n'
        "error: something named\n"
    )
    assert step_times(log.read_text()) == [
        ("example_zip", "SUCCESS", 0.662),
        ("token_stats", "SUCCESS", 3.21),
        ("training_run", "SUCCESS", 100.0),  # Dagster writes minutes and seconds ("1m40s"), not a fraction
        ("vae_latents", "SUCCESS", 3720.0),
        ("inference_smoke", "FAILURE", None),
    ]
    run = tmp_path / "ws" / "runs" / "abc"
    (run / "results").mkdir(parents=True)
    (run / "checkpoints" / "step_final").mkdir(parents=True)
    (run / "results" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "ce": 12.0, "mse": 1.2, "steps_per_sec": 0.5})
        + "\n"
        + json.dumps({"step": 16, "ce": 4.5, "mse": 0.9, "steps_per_sec": 0.25})  # 15 steps at 4 s
        + "\n"
    )
    (run / "torchrun.log").write_text("[x] all ranks: 60 VAE image(s) from the latent cache, 8 encoded live\n")
    (tmp_path / "ws" / "runs" / "latest.json").write_text(json.dumps({"run_dir": str(run)}))
    text = example_summary(tmp_path / "ws", log, 1, 100.0, "/home")
    assert "FAILED (exit 1)" in text and "training_run" in text and "100.0 s" in text
    assert (
        "16 steps in 62 s, CE 12.00 -> 4.50" in text
        and "60 from the latent cache, 8 encoded live" in text
        and str(run / "checkpoints" / "step_final") in text
    )
    assert "error: something named" in text and "DAGSTER_HOME=/home" in text
