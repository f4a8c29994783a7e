"""Shared setup of the trainer tests: upstream-style arguments over the small packed fixture, running
the CLI in-process or under torchrun, and reading what a run wrote."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from packed_fixtures import SMALL_PARAMS

from bagel_core.train.args import parse_args
from bagel_core.train.checkpoint import complete_steps
from bagel_core.train.distributed import init_distributed, shutdown
from bagel_core.train.metrics import read_metrics
from bagel_core.train.preflight import preflight
from bagel_core.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def train_args(fx, root: Path, manifest: Path | None = None, **over: Any) -> list[str]:
    """Arguments for a short tiny-preset run on the fixture; ``root`` gets checkpoints and results."""
    base: dict[str, Any] = {
        "dataset_config_file": fx.groups,
        "dataset_info": fx.registry,
        "num_workers": 0,
        "model_preset": "tiny",
        "checkpoint_dir": root / "ckpt",
        "results_dir": root / "results",
        "expected_num_tokens": SMALL_PARAMS.expected_num_tokens,
        "max_num_tokens": SMALL_PARAMS.max_num_tokens,
        "max_num_tokens_per_sample": SMALL_PARAMS.max_num_tokens_per_sample,
        "prefer_buffer_before": SMALL_PARAMS.prefer_buffer_before,
        "max_buffer_size": SMALL_PARAMS.max_buffer_size,
        "text_cond_dropout_prob": 0.0,
        "vae_cond_dropout_prob": 0.0,
        "vit_cond_dropout_prob": 0.0,
        "warmup_steps": 0,
        "lr": 1e-3,
        "ema": 0.9,
        "log_every": 1,
        "save_every": 1000,
        "total_steps": 4,
        "global_seed": 7,
        "sharding_strategy": "FULL_SHARD",
    }
    if manifest is not None:
        base["manifest"] = manifest
    base.update(over)
    out: list[str] = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def records(results_dir: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` by step (the last record of a step logged twice)."""
    return read_metrics(results_dir)


@contextlib.contextmanager
def trainer_session(argv: list[str]) -> Iterator[Trainer]:
    """A built (and resumed) one-process Trainer; the process group is torn down afterwards."""
    cfg = parse_args(argv, world_size=1)
    launch = preflight(cfg, 1)
    dist_info = init_distributed(cfg.training.sharding_strategy, cfg.training.num_replicate, cfg.training.num_shard)
    trainer = None
    try:
        trainer = Trainer(cfg, launch, dist_info, out=io.StringIO())
        yield trainer
    finally:
        if trainer is not None:
            trainer.metrics.close()
        shutdown(dist_info)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of a (possibly FSDP) module's state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def torchrun_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        WANDB_MODE=env.get("WANDB_MODE", "disabled"),
        TMPDIR=str(tmp),
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
    )
    return env


def torchrun(
    nproc: int, args: list[str], tmp: Path, module: str = "bagel_core.train", timeout: int = 240, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc_per_node N -m MODULE ARGS`` with the test environment."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", module, *args]
    return subprocess.run(
        command, env=torchrun_env(tmp), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, **popen
    )


def kill_when_saved(command: list[str], env: dict[str, str], ckpt: Path, step: int) -> int:
    """Start a torchrun job and SIGKILL it with every rank and DataLoader worker once ``step_<step>``
    is complete (the ranks are mid-way through the next step then)."""
    from assets.launcher import descendants

    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if step in complete_steps(ckpt):
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=60)
