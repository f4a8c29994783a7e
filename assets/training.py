"""Training: ``training_run`` launches ``torchrun -m bagel_core.train`` on the registered data and the
sampling manifest, records every checkpoint as a partition of ``checkpoint`` while it trains, then
``model_export`` (the inference-ready ``step_final``) and ``inference_smoke`` (an image and an answer).

The trainer knows nothing of Dagster: it writes ``metrics.jsonl``, ``log.txt`` and complete step
directories (marker last), and this asset watches them. Every run trains in its own folder
``runs/<run id>/``; ``runs/latest.json`` points at the newest finished one.
"""

import json
import math
import os
import re
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets import presentation
from assets.launcher import LocalTorchrunLauncher
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import manifest_mismatches, sampling_manifest
from bagel_core.config.errors import ConfigError
from bagel_core.train.checkpoint import TRAIN_STATE, complete_steps, step_dir
from bagel_core.train.export import verify_checkpoint
from bagel_core.train.metrics import read_metrics

CHECKPOINTS = dg.DynamicPartitionsDefinition(name="bagel_checkpoints")
checkpoint = dg.AssetSpec(
    "checkpoint",
    partitions_def=CHECKPOINTS,
    deps=["training_run"],
    group_name="training",
    kinds={"pytorch"},
    description="One partition per saved step of a training run (<run>-step<N>): path, losses, tokens/s, size.",
)
LATEST = "latest.json"
_ERROR_LINE = re.compile(r"(^error: .*|^\[rank\d+\]: \w+(Error|Exception)\b.*)")


class TrainingRunConfig(dg.Config):
    """Training arguments (upstream names); defaults train the built-in example visibly in about two minutes
    on 2 CPU processes. ``extra_args`` passes any other upstream argument, e.g. ``["--freeze_vit", "True"]``."""

    model_preset: str = "tiny"
    model_path: str = ""  # a BAGEL model directory to fine-tune (empty: a random model of model_preset)
    # "base": model_path (or model_preset); "latest_export": continue from the newest run's step_final when
    # there is one (scheduled / sensor-triggered retraining), else the base model
    start_from: str = "base"
    total_steps: int = 16
    save_every: int = 8
    log_every: int = 1
    lr: float = 5e-3
    warmup_steps: int = 2
    ema: float = 0.9
    global_seed: int = 4396
    keep_last_k: int = 0
    extra_args: list[str] = Field(default_factory=list)


def training_args(config: TrainingRunConfig, launch: TrainingLaunch, workspace: PipelineWorkspace, run_dir: Path):
    args = [
        "--dataset_info", str(workspace.registry_path), "--dataset_config_file", str(workspace.dataset_config_path),
        "--manifest", str(workspace.manifest_dir), "--results_dir", str(run_dir / "results"),
        "--checkpoint_dir", str(run_dir / "checkpoints"), "--total_steps", str(config.total_steps),
        "--save_every", str(config.save_every), "--log_every", str(config.log_every), "--lr", str(config.lr),
        "--warmup_steps", str(config.warmup_steps), "--ema", str(config.ema), "--global_seed", str(config.global_seed),
        "--keep_last_k", str(config.keep_last_k), "--sharding_strategy", "FULL_SHARD",
        *launch.train_args(),
    ]  # fmt: skip
    model_path = config.model_path
    if config.start_from == "latest_export" and (workspace.runs_dir / LATEST).is_file():
        model_path = str(latest_final(workspace))
    elif config.start_from not in ("base", "latest_export"):
        raise dg.Failure(f"training_run: start_from {config.start_from!r} must be 'base' or 'latest_export'")
    args += ["--model_path", model_path] if model_path else ["--model_preset", config.model_preset]
    return args + list(config.extra_args)


def _checkpoint_event(run_key: str, ckpt: Path, step: int, records: dict[int, dict]) -> dg.AssetMaterialization:
    path = step_dir(ckpt, step)
    rec = records.get(step, {})
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return dg.AssetMaterialization(
        asset_key="checkpoint",
        partition=f"{run_key}-step{step:08d}",
        metadata={
            "step": step,
            "path": dg.MetadataValue.path(str(path)),
            "size_bytes": size,
            "loss": rec.get("loss"),
            "ce": rec.get("ce"),
            "mse": rec.get("mse"),
            "tokens_per_sec": rec.get("tokens_per_sec"),
        },
    )


def _failure_text(log: Path) -> str:
    """The failing rank's own words: its ``error: ...`` line or exception line, else the log's tail."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line.strip()))]
    picked = list(dict.fromkeys(errors))[:5] or lines[-20:]
    return "\n".join(picked)


def _draw_losses(records: dict[int, dict]):
    def draw(fig) -> None:
        ax = fig.add_subplot()
        steps = sorted(records)
        ax.plot(steps, [records[s]["ce"] for s in steps], label="CE")
        ax.plot(steps, [records[s]["mse"] for s in steps], label="MSE")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)

    return draw


@dg.asset(
    group_name="training",
    deps=[sampling_manifest],
    kinds={"pytorch"},
    pool="gpu",
    check_specs=[
        dg.AssetCheckSpec(
            "checkpoints_load_and_losses_finite",
            asset="training_run",
            blocking=True,
            description="Every saved step has the model's and the EMA's full key set (checked from the DCP "
            "metadata, no tensor read) and finite losses up to it; otherwise nothing is exported.",
        )
    ],
    description="torchrun -m bagel_core.train (FSDP2) on the registered data and the sampling manifest; each "
    "saved step is recorded as a checkpoint partition while it trains.",
)
def training_run(
    context: dg.AssetExecutionContext,
    config: TrainingRunConfig,
    workspace: PipelineWorkspace,
    launch: TrainingLaunch,
    launcher: LocalTorchrunLauncher,
):
    problems = manifest_mismatches(workspace, launch)
    if problems:
        raise dg.Failure(
            "the sampling manifest does not match the launch configuration", metadata={"problems": problems}
        )
    run_key = context.run_id[:8]
    run_dir = workspace.runs_dir / run_key
    ckpt, results, log = run_dir / "checkpoints", run_dir / "results", run_dir / "torchrun.log"
    commands = launcher.commands(
        launch.nnodes, launch.nproc_per_node, training_args(config, launch, workspace, run_dir)
    )
    for command in commands:
        context.log.info("launching: " + " ".join(command))
    started = time.monotonic()
    job = launcher.start(commands, log, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    reported: set[int] = set()
    offset = 0
    try:
        while True:
            finished = job.poll() is not None
            if log.is_file():
                with open(log, errors="replace") as handle:
                    handle.seek(offset)
                    for line in handle.read().splitlines():
                        if line.strip() and "DEBUG" not in line:
                            context.log.info(line)
                    offset = handle.tell()
            new = [s for s in complete_steps(ckpt) if s not in reported]
            if new:
                records = read_metrics(results)
                for step in new:
                    context.instance.add_dynamic_partitions(CHECKPOINTS.name, [f"{run_key}-step{step:08d}"])
                    yield _checkpoint_event(run_key, ckpt, step, records)
                    reported.add(step)
            if finished:
                break
            time.sleep(1.0)
    finally:
        if job.poll() is None:  # cancelled, or this step failed: leave no rank or worker behind
            killed = launcher.stop(job)
            context.log.warning(f"stopped torchrun and {len(killed)} process(es) below it")
    if job.poll() != 0:
        raise dg.Failure(
            description=f"training failed (torchrun exit {job.poll()}):\n{_failure_text(log)}",
            metadata={"log": dg.MetadataValue.path(str(log))},
        )
    records = read_metrics(results)
    steps = sorted(records)
    first, last = records[steps[0]], records[steps[-1]]
    (workspace.runs_dir / LATEST).write_text(json.dumps({"run_dir": str(run_dir), "run_id": context.run_id}))
    yield checkpoints_check(ckpt, sorted(reported), records)
    yield dg.MaterializeResult(
        asset_key="training_run",
        metadata={
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "steps": last["step"],
            "first_ce": first["ce"],
            "final_ce": last["ce"],
            "final_ce_over_first": last["ce"] / first["ce"] if first["ce"] else None,
            "final_mse": last["mse"],
            "tokens_per_sec": last.get("tokens_per_sec"),
            "checkpoints": len(reported),
            "wall_s": round(time.monotonic() - started, 1),
            "loss_curve": presentation.figure(_draw_losses(records), "loss curve"),
            "last_steps": presentation.table([records[s] for s in steps[-5:]]),
        },
    )


def checkpoints_check(ckpt: Path, steps: list[int], records: dict[int, dict]) -> dg.AssetCheckResult:
    """Each saved step loads (key sets and shapes from its metadata) and the losses up to it are finite."""
    problems = []
    for step in steps:
        try:
            verify_checkpoint(step_dir(ckpt, step))
        except ConfigError as exc:
            problems.append(f"step {step}: {exc}")
    bad = [s for s, r in records.items() if not all(math.isfinite(r.get(k) or 0.0) for k in ("loss", "ce", "mse"))]
    if bad:
        problems.append(f"non-finite losses at steps {bad[:10]}")
    if not steps:
        problems.append("no checkpoint was saved")
    return dg.AssetCheckResult(
        check_name="checkpoints_load_and_losses_finite",
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"checkpoints": len(steps), "problems": dg.MetadataValue.json(problems)},
    )


def latest_final(workspace: PipelineWorkspace) -> Path:
    """``step_final`` of the newest finished training run."""
    pointer = workspace.runs_dir / LATEST
    if not pointer.is_file():
        raise dg.Failure(f"no finished training run ({pointer} missing): materialise training_run first")
    return Path(json.loads(pointer.read_text())["run_dir"]) / "checkpoints" / "step_final"


@dg.asset(
    group_name="training",
    deps=[training_run],
    kinds={"safetensors"},
    description="The inference-ready export of the newest run (step_final: released layout, bf16 EMA).",
)
def model_export(workspace: PipelineWorkspace) -> dg.MaterializeResult:
    from safetensors import safe_open

    final = latest_final(workspace)
    with safe_open(str(final / "ema.safetensors"), framework="pt") as f:
        keys = len(list(f.keys()))
        step = f.metadata().get("step")
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
    state = json.loads((final.parent / f"step_{step}" / TRAIN_STATE).read_text()) if step else {}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(final)),
            "keys": keys,
            "size_bytes": size,
            "step": int(step) if step else None,
            "world_size": state.get("world_size"),
            "files": dg.MetadataValue.json(sorted(p.name for p in final.iterdir())),
        }
    )


@dg.asset(
    group_name="training",
    deps=[model_export],
    kinds={"pytorch"},
    description="Loads the export with setup_models, generates an image and answers a question about it.",
)
def inference_smoke(workspace: PipelineWorkspace) -> dg.MaterializeResult:
    import torch

    from bagel_core.data.transforms import ImageTransform
    from bagel_core.inference import Inferencer, setup_models

    final = latest_final(workspace)
    started = time.monotonic()
    model, vae, tokenizer, ids = setup_models(final, device="cpu", dtype=torch.float32)
    small = {"vae_transform": ImageTransform(256, 64, 16), "vit_transform": ImageTransform(224, 56, 14)}
    inferencer = Inferencer(model, vae, tokenizer, ids, **small)
    image = inferencer.generate("a red circle on the left", height=64, width=64, num_timesteps=4, seed=0)
    answer = inferencer.understand(image, "What is in the image?", max_new_tokens=8)

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.imshow(image)
        ax.axis("off")

    return dg.MaterializeResult(
        metadata={
            "image": presentation.figure(draw, "generated image", size=(2, 2)),
            "answer": answer,
            "seconds": round(time.monotonic() - started, 2),
        }
    )
