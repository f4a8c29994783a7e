"""torchrun with 2 CPU processes (gloo, FSDP2, DCP): the same global batch gives the single-process
losses and weights; a run killed with SIGKILL resumes to the very losses of an uninterrupted run with
2 DataLoader workers per rank; an offline W&B run keeps its metrics and never the API key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from packed_fixtures import make_manifest, small_fixture
from safetensors.torch import load_file
from train_equivalence import run_steps
from train_fixtures import (
    full_state,
    kill_when_saved,
    records,
    torchrun,
    torchrun_env,
    train_args,
    trainer_session,
)

from bagel_core.train.checkpoint import complete_steps


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    # world size 2 x 2 DataLoader workers: every reader needs units, and usable VLM lines among them
    return small_fixture(tmp_path_factory.mktemp("dist") / "data", t2i_files=4, vlm_copies=3)


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_two_processes_equal_one_process_on_the_same_global_batch(fx, tmp_path):
    manifest = make_manifest(fx, tmp_path / "manifest_w2", world_size=2)
    steps = 3
    env = {
        "EQUIV_GROUPS": str(fx.groups),
        "EQUIV_REGISTRY": str(fx.registry),
        "EQUIV_MANIFEST": str(manifest),
        "EQUIV_STEPS": str(steps),
        "EQUIV_OUT": str(tmp_path / "two"),
    }
    argv = train_args(fx, tmp_path / "run2", lr=3e-3)
    os.environ.update(env)
    try:
        result = torchrun(2, argv, tmp_path, module="train_equivalence")
    finally:
        for key in env:
            os.environ.pop(key, None)
    _check(result)
    two = json.loads((tmp_path / "two" / "stats.json").read_text())
    with trainer_session(train_args(fx, tmp_path / "run1", lr=3e-3)) as trainer:
        one = run_steps(trainer, [0, 1], steps, env)
        weights = full_state(trainer.model)
    for a, b in zip(one, two, strict=True):
        for key in ("ce", "mse", "loss", "grad_norm", "total_ce_tokens", "total_mse_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert one[-1]["loss"] != one[0]["loss"]
    other = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert other.keys() == weights.keys()
    # The ViT's key biases get no gradient in exact arithmetic (softmax ignores a shift shared by every
    # key of a query); AdamW with eps 1e-15 turns their rounding noise into full-size steps, which
    # therefore differ with the summation order. Every other weight must agree.
    noise_driven = {k for k in weights if k.startswith("vit_model.") and k.endswith("k_proj.bias")}
    differ = [k for k in weights if k not in noise_driven and not torch.allclose(other[k], weights[k], 1e-4, 1e-5)]
    assert not differ, differ


@pytest.mark.slow  # CI runs tests/reliability/test_rank_kill.py (one rank killed) and the secrets canary instead
def test_sigkill_then_auto_resume_reproduces_the_straight_run_and_wandb_offline(fx, tmp_path, monkeypatch):
    fake_key = "local-" + "5e1f0a9b" * 5
    common = {"num_workers": 2, "total_steps": 6, "log_every": 1, "wandb_offline": True}
    # the uninterrupted run, with W&B offline and a key in the environment that must never be written
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    _check(torchrun(2, train_args(fx, tmp_path / "straight", **common), tmp_path))
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    straight = records(tmp_path / "straight" / "results")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    ce = [straight[s]["ce"] for s in range(1, 7)]
    assert ce[4] + ce[5] < ce[0] + ce[1], ce  # the loss falls under 2-process FSDP2 training
    runs = list((tmp_path / "straight" / "results" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(b"tokens_per_sec" in p.read_bytes() for p in runs[0].glob("*.wandb"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert fake_key.encode() not in path.read_bytes(), path
    # killed with SIGKILL right after step_3 is saved, then relaunched with --auto_resume True
    run = tmp_path / "killed"
    argv = train_args(fx, run, save_every=3, auto_resume=True, **common)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "bagel_core.train", *argv]
    assert kill_when_saved(command, torchrun_env(tmp_path), run / "ckpt", 3) != 0
    assert complete_steps(run / "ckpt") == [3]
    _check(torchrun(2, argv, tmp_path))
    resumed = records(run / "results")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["tokens_per_step"] == straight[step]["tokens_per_step"], step
    assert "at step 3 (exact: same world size)" in (run / "results" / "log.txt").read_text()
    a = load_file(str(tmp_path / "straight" / "ckpt" / "step_final" / "ema.safetensors"))
    b = load_file(str(run / "ckpt" / "step_final" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same checkpoint resumed by one process: model, EMA and optimizer resharded, data order restarts
    argv_one = train_args(fx, run, save_every=3, auto_resume=True, num_workers=2, total_steps=6)
    with trainer_session(argv_one) as trainer:
        assert trainer.step == 6
        ema = full_state(trainer.ema)
    log = (run / "results" / "log.txt").read_text()
    assert "resharded from world size 2 to 1; the data order restarts" in log
    assert all(torch.equal(ema[k].bfloat16(), b[k]) for k in b)
