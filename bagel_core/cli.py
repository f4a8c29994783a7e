"""``bagel``: the command line of bagel-pipeline.

    bagel example                      run the whole pipeline on the built-in example (Dagster job)
    bagel data download                fetch the example zip (builtin / URL) and extract it safely
    bagel data registry                write the dataset registry + dataset-group YAML for a folder
    bagel data check                   validate a registry before anything runs
    bagel data index | stats | plan    validate+index samples, token statistics, sampling manifest
    bagel data latents                 encode every VAE image once (the training's latent cache)
    bagel infer                        text-to-image / understanding with a BAGEL checkpoint
    bagel export                       a training step directory -> inference-ready released layout
    bagel plan-memory <training args>  memory per GPU / node of a launch: table, verdict, smallest change

Each stage package owns its subcommand in a ``cli`` module with an ``add_parser`` function,
registered here explicitly (a missing module is an import error, never a silent skip). Those
modules import only what building the parser needs; the heavy libraries (DuckDB, Arrow, polars,
torch) load inside the command functions, so ``bagel --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bagel_core.config.errors import ConfigError, DataError
from bagel_core.index import cli as index_cli
from bagel_core.inference import cli as inference_cli
from bagel_core.plan import cli as plan_cli
from bagel_core.stats import cli as stats_cli
from bagel_core.train import cli as train_cli
from bagel_core.train import latents as latents_cli
from bagel_core.train import memory_cli


def _cmd_download(args: argparse.Namespace) -> int:
    from bagel_core.data.example_generator import ExampleConfig
    from bagel_core.data.fetch import fetch_archive, safe_extract, summarize_tree

    builtin = ExampleConfig(t2i_files=args.t2i_files, vlm_lines=args.vlm_lines) if args.source == "builtin" else None
    fetched = fetch_archive(args.source, args.out, args.sha256, builtin_config=builtin, progress=not args.quiet)
    extracted = safe_extract(fetched.path, args.out, max_total_bytes=args.max_bytes, max_files=args.max_files)
    print(f"archive   {fetched.path}  ({fetched.bytes:,} bytes, sha256 {fetched.sha256})")
    state = "already extracted (unchanged archive)" if extracted.skipped else f"{extracted.files} files"
    print(f"extracted {Path(args.out).resolve()}/{', '.join(extracted.top_level)}  [{state}]")
    for top in extracted.top_level:
        for task, info in summarize_tree(Path(args.out) / top).items():
            print(f"  {task:<10} {info['files']:>7} files {info['bytes']:>14,} bytes")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from bagel_core.config.discover import default_dataset_config, discover_registry
    from bagel_core.config.validate import require_valid

    out = Path(args.out)
    registry = discover_registry(args.root, parquet_info_dir=out.parent / "parquet_info")
    registry.source = out
    warnings = require_valid(registry)
    registry.save(out)
    print(f"registry  {out}  ({len(registry.entries)} datasets)")
    for entry in registry.entries:
        print(f"  {entry.group}/{entry.name}: files={entry.num_files} samples={entry.num_total_samples}")
    if args.groups_out:
        default_dataset_config(registry).save(args.groups_out)
        print(f"groups    {args.groups_out}")
    for warning in warnings:
        print(warning, file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.registry import Registry
    from bagel_core.config.validate import validate_registry

    registry = Registry.load(args.registry)
    findings = validate_registry(registry)
    if args.dataset_config:
        load_dataset_config(args.dataset_config).check_against(registry)
    for finding in findings:
        print(finding)
    errors = sum(f.severity == "error" for f in findings)
    print(f"{len(registry.entries)} datasets checked: {errors} error(s), {len(findings) - errors} warning(s)")
    return 1 if errors else 0


def dagster_home_for(workspace: Path) -> Path:
    """A persistent DAGSTER_HOME beside the workspace, so `dagster dev` later shows these runs."""
    home = Path(os.environ.get("DAGSTER_HOME") or workspace / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # training_run sits in the "gpu" pool: one training at a time on this machine
        config.write_text("telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n")
    return home


def _cmd_example(args: argparse.Namespace) -> int:
    workspace = Path(args.workspace).resolve()
    env = dict(os.environ, BAGEL_WORKSPACE=str(workspace), DAGSTER_HOME=str(dagster_home_for(workspace)))
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or shutil.which("dagster")
    if dagster is None:
        raise ConfigError("the `dagster` command is not installed in this environment; run `pip install -e .`")
    command = [dagster, "job", "execute", "-m", "pipelines", "-j", "bagel_example_job"]
    for config in args.config or []:
        command += ["-c", config]
    log_path = workspace / "logs" / f"bagel_example_{time.strftime('%Y%m%d_%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"running bagel_example_job (workspace {workspace}); Dagster's event stream goes to {log_path}")
    started = time.monotonic()
    with open(log_path, "w") as log:
        rc = subprocess.call(command, env=env, stdout=log if not args.verbose else None, stderr=subprocess.STDOUT)
    print(example_summary(workspace, log_path, rc, time.monotonic() - started, env["DAGSTER_HOME"]))
    return rc


_STEP_DONE = re.compile(r'STEP_(SUCCESS|FAILURE) - .*step "(\w+)"(?: in ((?:[\d.]+(?:ms|h|m|s))+))?')
_DURATION_PART = re.compile(r"([\d.]+)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Seconds in a Dagster duration (its ``format_duration``: ``0.83ms``, ``533ms``, ``5.6s``, ``4m52s``, ``1h4m``)."""
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in _DURATION_PART.findall(text))


def step_times(log_text: str) -> list[tuple[str, str, float | None]]:
    """(step, SUCCESS|FAILURE, seconds) from Dagster's event stream, in order."""
    return [
        (m.group(2), m.group(1), None if m.group(3) is None else duration_seconds(m.group(3)))
        for m in _STEP_DONE.finditer(log_text)
    ]


def example_summary(workspace: Path, log_path: Path, rc: int, seconds: float, dagster_home: str) -> str:
    """What the example job produced, where, how long each stage took, and how to look at it."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [f"\nbagel_example_job {'succeeded' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", ""]
    width = max((len(name) for name, _, _ in step_times(text)), default=10) + 2
    for name, state, s in step_times(text):
        lines.append(f"  {name:<{width}} {state.lower():<8} {'' if s is None else f'{s:7.1f} s'}")
    produced = [
        ("registry", workspace / "registry" / "dataset_info.yaml"),
        ("index", workspace / "index" / "index.parquet"),
        ("token statistics", workspace / "stats" / "token_stats.parquet"),
        ("sampling manifest", workspace / "manifest" / "manifest.parquet"),
    ]
    latest = workspace / "runs" / "latest.json"
    if latest.is_file():
        run = Path(json.loads(latest.read_text())["run_dir"])
        produced += [("training run", run), ("inference-ready model", run / "checkpoints" / "step_final")]
        # torch: only after the job, never for --help
        from bagel_core.train.metrics import read_metrics, steps_seconds, vae_image_sources

        records = [rec for _, rec in sorted(read_metrics(run / "results").items())]
        if records:
            first, last = records[0], records[-1]
            ce = f"CE {first['ce']:.2f} -> {last['ce']:.2f}"
            lines += ["", f"  training: {last['step']} steps in {steps_seconds(records):.0f} s, {ce}, "]
            lines[-1] += f"MSE {first['mse']:.3f} -> {last['mse']:.3f}"
        log = run / "torchrun.log"
        sources = vae_image_sources(log.read_text(errors="replace")) if log.is_file() else None
        if sources is not None:
            lines.append(f"  VAE images: {sources['cached']} from the latent cache, {sources['live']} encoded live")
    lines += [""] + [f"  {what:<22} {path}" for what, path in produced if path.exists()]
    if rc != 0:
        errors = [x for x in text.splitlines() if "STEP_FAILURE" in x or "error:" in x][-5:]
        lines += ["", "  what failed:"] + [f"    {x[-300:]}" for x in errors]
    lines += [
        "",
        f"  full event log: {log_path}",
        f"  open the UI:    DAGSTER_HOME={dagster_home} {Path(sys.executable).parent / 'dagster'} dev -h 127.0.0.1",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bagel",
        description="Prepare data for, train and run BAGEL with a Dagster pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `bagel example` for the whole pipeline on the built-in example.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    example = top.add_parser("example", help="run the main Dagster job on the built-in example")
    example.add_argument(
        "--workspace",
        default=os.environ.get("BAGEL_WORKSPACE", "data/pipeline"),
        help="folder for everything the pipeline writes (default: %(default)s)",
    )
    example.add_argument("-c", "--config", action="append", help="extra Dagster run-config YAML (repeatable)")
    example.add_argument("--verbose", action="store_true", help="print Dagster's event stream instead of logging it")
    example.set_defaults(func=_cmd_example)

    data = top.add_parser("data", help="fetch, register, validate, index and plan datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    download = data_sub.add_parser("download", help="fetch the example zip and extract it safely")
    download.add_argument(
        "--source",
        default="builtin",
        help="'builtin' (generated locally), an http(s):// or file:// URL, or a path "
        "(official: https://lf3-static.bytednsdoc.com/obj/eden-cn/nuhojubrps/bagel_example.zip)",
    )
    download.add_argument("--out", required=True, help="writes OUT/bagel_example.zip and OUT/bagel_example/")
    download.add_argument("--sha256", help="expected sha256 of the archive; a mismatch fails")
    download.add_argument("--max-bytes", type=int, default=20 * 1024**3, help="refuse archives larger unpacked")
    download.add_argument("--max-files", type=int, default=200_000, help="refuse archives with more files")
    download.add_argument("--t2i-files", type=int, default=10, help="builtin only: number of T2I shards")
    download.add_argument("--vlm-lines", type=int, default=100, help="builtin only: number of VLM lines")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_cmd_download)

    registry = data_sub.add_parser("registry", help="write a dataset registry for an extracted example folder")
    registry.add_argument("--root", required=True, help="the extracted bagel_example folder (or its parent)")
    registry.add_argument("--out", required=True, help="registry YAML to write (upstream DATASET_INFO fields)")
    registry.add_argument("--groups-out", help="also write a dataset-group YAML (upstream example.yaml schema)")
    registry.set_defaults(func=_cmd_registry)

    check = data_sub.add_parser("check", help="validate a registry (exit 1 on errors)")
    check.add_argument("--registry", required=True)
    check.add_argument("--dataset-config", help="also check a dataset-group YAML against the registry")
    check.set_defaults(func=_cmd_check)

    for stage in (index_cli, stats_cli, plan_cli, latents_cli):
        stage.add_parser(data_sub)
    inference_cli.add_parser(top)
    train_cli.add_parser(top)
    memory_cli.add_parser(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_training_args", False):  # plan-memory: what it does not know are training arguments
        args.training_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
