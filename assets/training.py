"""Training: ``training_run`` launches ``torchrun -m bagel_core.train`` on the registered data and the
sampling manifest, records every checkpoint as a partition of ``checkpoint`` while it trains, then
``model_export`` (the inference-ready ``step_final``) and ``inference_smoke`` (an image and an answer).

The trainer knows nothing of Dagster: it writes ``metrics.jsonl``, ``log.txt`` and complete step
directories (marker last), and tells an observer about its events. This asset passes
``--observer assets.pipes_observer:PipesObserver`` so that rank 0 reports through a Dagster Pipes session
(start, W&B link, each complete checkpoint, the export, an error); complete step directories found on
disk are recorded too, as a backstop. Every run trains in its own folder ``runs/<run id>/`` (or in a
fixed ``checkpoint_dir``); ``runs/latest.json`` points at the newest finished one.
"""

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets import presentation
from assets.k8s_launcher import K8sTorchrunLauncher
from assets.launcher import LocalTorchrunLauncher
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.sampling_manifest import manifest_mismatches, sampling_manifest
from assets.vae_latents import vae_latents
from bagel_core.config.errors import ConfigError
from bagel_core.loader.latent_cache import MANIFEST as LATENTS_MANIFEST
from bagel_core.loader.latent_cache import CacheManifest
from bagel_core.train.checkpoint import TRAIN_STATE, complete_steps, step_dir
from bagel_core.train.export import verify_checkpoint
from bagel_core.train.metrics import read_metrics, vae_image_sources

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
OBSERVER = "assets.pipes_observer:PipesObserver"  # rank 0's reporter (dagster_pipes only, see that module)
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
    # empty: a fresh folder per Dagster run (runs/<run>/checkpoints). Set a fixed folder to continue one training
    # across runs (with extra_args ["--auto_resume", "True"]); its lock keeps a second training out of it.
    checkpoint_dir: str = ""
    # read VAE moments from the vae_latents asset's cache when it exists (the trainer refuses, loudly, a cache
    # made with another VAE or other transforms and encodes live)
    latent_cache: bool = True
    extra_args: list[str] = Field(default_factory=list)


def checkpoint_root(config: TrainingRunConfig, run_dir: Path) -> Path:
    return Path(config.checkpoint_dir).expanduser().absolute() if config.checkpoint_dir else run_dir / "checkpoints"


def training_args(config: TrainingRunConfig, launch: TrainingLaunch, workspace: PipelineWorkspace, run_dir: Path):
    args = [
        *workspace.trainer_data_args(), "--results_dir", str(run_dir / "results"),
        "--checkpoint_dir", str(checkpoint_root(config, run_dir)), "--total_steps", str(config.total_steps),
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
    if config.latent_cache and (workspace.latents_dir / LATENTS_MANIFEST).is_file():
        args += ["--latent_cache", str(workspace.latents_dir)]  # the trainer checks it against its own VAE
    return args + list(config.extra_args)


def latent_cache_shortfall(config: TrainingRunConfig, workspace: PipelineWorkspace) -> str:
    """Why the latent cache will not cover this run ('' when it does, or when there is none): a cache planned for
    fewer steps than ``total_steps`` leaves the later steps' images to live encoding."""
    manifest = CacheManifest.read(workspace.latents_dir) if config.latent_cache else None
    coverage = manifest.coverage if manifest is not None else {}
    if coverage.get("scope") == "planned" and coverage.get("steps", 0) < config.total_steps:
        return (
            f"the latent cache holds the samples of the first {coverage['steps']} step(s), this run has "
            f"{config.total_steps}: later steps encode their images live (set vae_latents' steps to "
            f"{config.total_steps}, or scope: all)"
        )
    return ""


def _checkpoint_event(run_key: str, ckpt: Path, step: int, records: dict[int, dict]) -> dg.AssetMaterialization:
    """One ``checkpoint`` partition: the step directory (complete: its marker is written) and that step's losses."""
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


def _failure_text(log: Path, progress: "TrainingProgress") -> str:
    """The failing rank's own words: its ``error: ...`` line or exception line, else the log's tail (plus what
    rank 0 reported through Pipes, when it did)."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line.strip()))]
    picked = list(dict.fromkeys(errors))[:5] or lines[-20:]
    if progress.reported_error and not any(progress.reported_error in line for line in picked):
        picked.insert(0, f"rank 0 reported: {progress.reported_error}")
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


PREFLIGHT_CHECK = "launch_preflight"
MEMORY_CHECK = "memory_plan_fits"
CHECKPOINTS_CHECK = "checkpoints_load_and_losses_finite"


def launch_preflight(
    args: list[str], world_size: int, checkpoint_dir: Path, local_world_size: int | None = None
) -> dg.AssetCheckResult:
    """The trainer's own start-up checks, run here before any process starts: registry and dataset YAML, the
    branches the data needs, the manifest against this world size (and no empty worker), the starting weights,
    ``max_latent_size`` against the data and the starting checkpoint, ``checkpoint_dir`` writable and not held
    by another training."""
    from bagel_core.train.args import parse_args
    from bagel_core.train.preflight import preflight

    problem = ""
    try:
        plan = preflight(parse_args(args), world_size, local_world_size)
    except ConfigError as exc:
        problem = str(exc)
    metadata: dict[str, Any] = {"checkpoint_dir": dg.MetadataValue.path(str(checkpoint_dir))}
    if problem:
        metadata["problem"] = dg.MetadataValue.text(problem)
    else:
        metadata["weights"] = plan.weights.kind
        metadata["max_latent_size"] = plan.model.max_latent_size
    return dg.AssetCheckResult(
        check_name=PREFLIGHT_CHECK, passed=not problem, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )


def plan_ce_tokens(workspace: PipelineWorkspace, launch: TrainingLaunch) -> list[str]:
    """``--plan_ce_tokens N`` from the token statistics (the most CE tokens a pack of this data can hold), so the
    memory plan sizes the CE logits for this data instead of a pack of nothing but CE tokens; [] without them."""
    from bagel_core.stats.token_stats import STATS_FILE
    from bagel_core.train.memory import ce_tokens_bound

    stats = workspace.stats_dir / STATS_FILE
    bound = ce_tokens_bound(stats, launch.max_num_tokens) if stats.is_file() else None
    return [] if bound is None else ["--plan_ce_tokens", str(bound)]


def memory_plan_check(args: list[str], launch: TrainingLaunch) -> dg.AssetCheckResult:
    """The memory plan of this launch (``bagel plan-memory``): bytes per GPU or rank and per node, blocking when
    it does not fit, with the smallest change that fits. Budgets: the launch resource's ``device_memory_gb`` /
    ``host_memory_gb``, else this machine's GPU, else its host RAM (a local CPU run). A k8s launch without
    ``device_memory_gb`` is planned but not judged: this machine says nothing about the pod's GPUs."""
    from bagel_core.train.preflight import plan_for_arguments

    metadata: dict[str, Any] = {}
    passed = False
    try:
        plan = plan_for_arguments(args, launch.nnodes, launch.nproc_per_node)
    except ConfigError as exc:
        metadata["problem"] = dg.MetadataValue.text(str(exc))
    else:
        unjudged = launch.backend == "k8s" and launch.device_memory_gb <= 0
        passed = plan.fits or unjudged
        metadata.update(
            verdict="not judged: set launch.device_memory_gb for a k8s launch" if unjudged else plan.verdict,
            device_peak_gib=round(plan.device_peak / 2**30, 2),
            host_peak_gib=round(plan.host_peak / 2**30, 2),
            device=plan.inputs.device,
            plan=dg.MetadataValue.md(f"```\n{plan.table()}\n```"),
        )
        if not passed:
            metadata["problem"] = dg.MetadataValue.text(plan.summary())
    return dg.AssetCheckResult(
        check_name=MEMORY_CHECK, passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )


@dataclass
class TrainingProgress:
    """What the training has told us so far (Pipes messages) and what is already recorded in Dagster."""

    run_key: str
    checkpoint_dir: Path
    results_dir: Path
    handled_messages: int = 0
    recorded: set[int] = field(default_factory=set)
    announced: set[int] = field(default_factory=set)  # steps rank 0 reported through Pipes
    wandb_url: str | None = None
    export_path: str | None = None
    reported_error: str | None = None

    def new_checkpoints(self, messages: list[dict]) -> list[int]:
        """Checkpoint steps announced since the last call, plus complete step directories nobody announced (a
        backstop for a report channel that failed)."""
        steps = []
        for message in messages[self.handled_messages :]:
            event = message.get("event")
            if event == "checkpoint":
                steps.append(int(message["step"]))
                self.announced.add(int(message["step"]))
            elif event == "start":
                self.wandb_url = message.get("wandb_url") or self.wandb_url
            elif event == "export":
                self.export_path = message.get("path")
            elif event == "error":
                self.reported_error = message.get("error")
        self.handled_messages = len(messages)
        steps += complete_steps(self.checkpoint_dir)
        return sorted({s for s in steps if s not in self.recorded})

    def record(self, context: dg.AssetExecutionContext, steps: list[int]) -> Iterator[dg.AssetMaterialization]:
        if not steps:
            return
        records = read_metrics(self.results_dir)
        for step in steps:
            context.instance.add_dynamic_partitions(CHECKPOINTS.name, [f"{self.run_key}-step{step:08d}"])
            yield _checkpoint_event(self.run_key, self.checkpoint_dir, step, records)
            self.recorded.add(step)


class LogTail:
    """Forwards the lines torchrun appends to its log (every rank's output) into the Dagster log."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def forward(self, log: Callable[[str], None]) -> None:
        if not self.path.is_file():
            return
        with open(self.path, errors="replace") as handle:
            handle.seek(self.offset)
            for line in handle.read().splitlines():
                if line.strip() and "DEBUG" not in line:
                    log(line)
            self.offset = handle.tell()


@dg.asset(
    group_name="training",
    deps=[sampling_manifest, vae_latents],
    kinds={"pytorch"},
    pool="gpu",
    check_specs=[
        dg.AssetCheckSpec(
            PREFLIGHT_CHECK,
            asset="training_run",
            blocking=True,
            description="Before any process starts: the trainer's own checks (registry, dataset YAML, manifest "
            "against the launch, starting weights, max_latent_size, checkpoint_dir writable and not in use).",
        ),
        dg.AssetCheckSpec(
            MEMORY_CHECK,
            asset="training_run",
            blocking=True,
            description="Before any process starts: the memory plan (weights, gradients, AdamW, EMA, gathered "
            "units, activations of a full pack, CE logits, VAE; host RAM per node) fits the GPUs, or this machine's "
            "RAM for a CPU run; otherwise it names the smallest change that fits.",
        ),
        dg.AssetCheckSpec(
            CHECKPOINTS_CHECK,
            asset="training_run",
            blocking=True,
            description="Every saved step has the model's and the EMA's full key set (checked from the DCP "
            "metadata, no tensor read) and finite losses up to it; otherwise nothing is exported.",
        ),
    ],
    description="torchrun -m bagel_core.train (FSDP2) on the registered data and the sampling manifest; rank 0 "
    "reports through Dagster Pipes, and each saved step is recorded as a checkpoint partition while it trains.",
)
def training_run(
    context: dg.AssetExecutionContext,
    config: TrainingRunConfig,
    workspace: PipelineWorkspace,
    launch: TrainingLaunch,
    launcher: LocalTorchrunLauncher,
    k8s_launcher: K8sTorchrunLauncher,
):
    problems = manifest_mismatches(workspace, launch)
    if problems:
        raise dg.Failure(
            "the sampling manifest does not match the launch configuration", metadata={"problems": problems}
        )
    run_key = context.run.run_id[:8]
    run_dir = workspace.runs_dir / run_key
    progress = TrainingProgress(run_key, checkpoint_root(config, run_dir), run_dir / "results")
    args = [*training_args(config, launch, workspace, run_dir), "--observer", OBSERVER]
    shortfall = latent_cache_shortfall(config, workspace)
    if shortfall:
        context.log.warning(f"training_run: {shortfall}")
    args += plan_ce_tokens(workspace, launch) if "--plan_ce_tokens" not in args else []
    memory_result = memory_plan_check(args, launch)
    yield memory_result
    if not memory_result.passed:
        raise dg.Failure(f"training_run: {MEMORY_CHECK} failed: {memory_result.metadata['problem'].value}")
    started = time.monotonic()
    if launch.backend == "k8s":
        yield from _train_on_kubernetes(context, k8s_launcher, launch, args, progress)
    elif launch.backend == "local":
        preflight_result = launch_preflight(args, launch.world_size, progress.checkpoint_dir, launch.nproc_per_node)
        yield preflight_result
        if not preflight_result.passed:
            raise dg.Failure(f"training_run: {PREFLIGHT_CHECK} failed: {preflight_result.metadata['problem'].value}")
        yield from _train_locally(context, launcher, launch, args, progress, run_dir / "torchrun.log")
    else:
        raise dg.Failure(f"training_run: launch.backend {launch.backend!r} must be 'local' or 'k8s'")
    records = read_metrics(progress.results_dir)
    if not records:
        raise dg.Failure(f"training finished without a logged step: nothing in {progress.results_dir}")
    steps = sorted(records)
    first, last = records[steps[0]], records[steps[-1]]
    pointer = {"run_dir": str(run_dir), "checkpoint_dir": str(progress.checkpoint_dir), "run_id": context.run.run_id}
    (workspace.runs_dir / LATEST).write_text(json.dumps(pointer))
    yield checkpoints_check(progress.checkpoint_dir, sorted(progress.recorded), records)
    metadata: dict[str, Any] = {
        "run_dir": dg.MetadataValue.path(str(run_dir)),
        "checkpoint_dir": dg.MetadataValue.path(str(progress.checkpoint_dir)),
        "steps": last["step"],
        "first_ce": first["ce"],
        "final_ce": last["ce"],
        "final_ce_over_first": last["ce"] / first["ce"] if first["ce"] else None,
        "final_mse": last["mse"],
        "tokens_per_sec": last.get("tokens_per_sec"),
        "checkpoints": len(progress.recorded),
        "checkpoints_reported_by_rank0": len(progress.announced),
        "wall_s": round(time.monotonic() - started, 1),
        "loss_curve": presentation.figure(_draw_losses(records), "loss curve"),
        "last_steps": presentation.table([records[s] for s in steps[-5:]]),
    }
    log = run_dir / "torchrun.log"
    sources = vae_image_sources(log.read_text(errors="replace")) if log.is_file() else None
    if sources is not None:
        metadata.update(vae_images_from_cache=sources["cached"], vae_images_encoded_live=sources["live"])
    if progress.wandb_url:
        metadata["wandb"] = dg.MetadataValue.url(progress.wandb_url)
    yield dg.MaterializeResult(asset_key="training_run", metadata=metadata)


def _train_locally(context, launcher, launch, args, progress: TrainingProgress, log: Path):
    """torchrun on this machine inside a Pipes session: poll its messages and the log while it runs, record each
    checkpoint as it completes, and leave no process behind whatever happens to this step."""
    commands = launcher.commands(launch.nnodes, launch.nproc_per_node, args)
    for command in commands:
        context.log.info("launching: " + " ".join(command))
    tail = LogTail(log)
    with dg.open_pipes_session(
        context=context,
        context_injector=dg.PipesTempFileContextInjector(),
        message_reader=dg.PipesTempFileMessageReader(),
        extras={"run_key": progress.run_key},
    ) as session:
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **session.get_bootstrap_env_vars()}
        job = launcher.start(commands, log, env=env)
        try:
            while True:
                finished = job.poll() is not None
                tail.forward(context.log.info)
                yield from progress.record(context, progress.new_checkpoints(session.get_custom_messages()))
                if finished:
                    break
                time.sleep(1.0)
        finally:
            if job.poll() is None:  # cancelled, or this step failed: leave no rank or worker behind
                killed = launcher.stop(job)
                context.log.warning(f"stopped torchrun and {len(killed)} process(es) below it")
    yield from progress.record(context, progress.new_checkpoints(session.get_custom_messages()))
    if job.poll() != 0:
        raise dg.Failure(
            description=f"training failed (torchrun exit {job.poll()}):\n{_failure_text(log, progress)}",
            metadata={"log": dg.MetadataValue.path(str(log))},
        )
    # session.get_results() is not yielded: the child reports no asset events of its own (only custom messages),
    # and training_run's one MaterializeResult, with the figures read back from the run, is yielded by the caller.


def _train_on_kubernetes(context, k8s_launcher, launch, args, progress: TrainingProgress):
    """One pod runs torchrun; its rank 0 reports through the pod's log, and the checkpoints it announced are
    recorded when the pod has finished."""
    invocation = k8s_launcher.run(
        context,
        train_args=args,
        nproc_per_node=launch.nproc_per_node,
        nnodes=launch.nnodes,
        extras={"run_key": progress.run_key},
    )
    yield from progress.record(context, progress.new_checkpoints(invocation.get_custom_messages()))


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
    latest = json.loads(pointer.read_text())
    return Path(latest.get("checkpoint_dir") or Path(latest["run_dir"]) / "checkpoints") / "step_final"


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


def smoke_inference(model_dir: Path) -> dict[str, Any]:
    """Load an inference-ready folder with setup_models, generate a 64 px image and answer a question about it;
    returns the metadata (the image as PNG, the answer, the time it took)."""
    import torch

    from bagel_core.data.transforms import ImageTransform
    from bagel_core.inference import Inferencer, setup_models

    started = time.monotonic()
    model, vae, tokenizer, ids = setup_models(model_dir, device="cpu", dtype=torch.float32)
    small = {"vae_transform": ImageTransform(256, 64, 16), "vit_transform": ImageTransform(224, 56, 14)}
    inferencer = Inferencer(model, vae, tokenizer, ids, **small)
    image = inferencer.generate("a red circle on the left", height=64, width=64, num_timesteps=4, seed=0)
    answer = inferencer.understand(image, "What is in the image?", max_new_tokens=8)

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.imshow(image)
        ax.axis("off")

    return {
        "image": presentation.figure(draw, "generated image", size=(2, 2)),
        "answer": answer,
        "seconds": round(time.monotonic() - started, 2),
    }


@dg.asset(
    group_name="training",
    deps=[model_export],
    kinds={"pytorch"},
    description="Loads the export with setup_models, generates an image and answers a question about it.",
)
def inference_smoke(workspace: PipelineWorkspace) -> dg.MaterializeResult:
    final = latest_final(workspace)
    return dg.MaterializeResult(metadata={**smoke_inference(final), "model_dir": dg.MetadataValue.path(str(final))})


def checkpoint_path(instance: dg.DagsterInstance, partition: str) -> Path:
    """The step directory recorded for one ``checkpoint`` partition."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("checkpoint"), asset_partitions=[partition]), limit=1
    ).records
    if not records:
        raise dg.Failure(f"checkpoint partition {partition} has no recorded materialisation (no path to load)")
    return Path(str(records[0].asset_materialization.metadata["path"].value))


@dg.asset(
    group_name="training",
    deps=[checkpoint],
    partitions_def=CHECKPOINTS,
    kinds={"pytorch"},
    description="One per checkpoint partition (new_checkpoint_sensor requests it): exports that step's EMA to a "
    "temporary inference-ready folder, generates an image and answers a question, then removes the folder.",
)
def checkpoint_smoke(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import tempfile

    from bagel_core.train.export import export_checkpoint

    step = checkpoint_path(context.instance, context.partition_key)
    if not step.is_dir():
        raise dg.Failure(f"{step} is gone (keep_last_k may have deleted it): nothing to evaluate")
    with tempfile.TemporaryDirectory(prefix="smoke-", dir=step.parent) as tmp:
        export_checkpoint(step, Path(tmp) / "model", weights="ema")
        metadata = smoke_inference(Path(tmp) / "model")
    return dg.MaterializeResult(metadata={**metadata, "checkpoint": dg.MetadataValue.path(str(step))})
