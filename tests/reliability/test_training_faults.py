"""Training faults, injected into a one-process training (the same FSDP2 + DCP path as torchrun): a non-finite
loss under both policies, a full disk during a save, hostile checkpoint files (pickle payloads, foreign
links), and the static rules that keep untrusted files from running code."""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
from packed_fixtures import small_fixture
from safetensors.torch import load_file
from train_fixtures import records, train_args

from bagel_core.train import checkpoint as ckpt_module
from bagel_core.train import trainer as trainer_module
from bagel_core.train.__main__ import cli
from bagel_core.train.checkpoint import MARKER, complete_steps
from bagel_core.train.export import export_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("faults") / "data")


def _nan_at(monkeypatch, step: int) -> None:
    """Make the loss of optimizer step ``step`` (1-based) NaN, as an overflow would."""
    real = trainer_module.micro_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, ce, mse = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), ce, mse) if calls["n"] == step else (loss, ce, mse)

    monkeypatch.setattr(trainer_module, "micro_loss", poisoned)


def test_nonfinite_loss_stops_naming_the_step_and_the_pack(fx, tmp_path, monkeypatch, capsys, fault):
    _nan_at(monkeypatch, 2)
    assert cli(train_args(fx, tmp_path, total_steps=3, save_every=1)) == 3
    err = capsys.readouterr().err
    assert "error: non-finite loss at step 2 (rank 0, micro-batch 0: loss nan; the pack held " in err
    assert re.search(r"the pack held \S+ \S+\.(parquet|jsonl) \(row group \d+, row \d+\)", err), err
    assert "--nonfinite_loss skip" in err
    assert complete_steps(tmp_path / "ckpt") == [1]  # nothing after the bad step was saved
    fault("NaN loss at step 2, `--nonfinite_loss stop` (default)", "exit 3; `error:` names step 2, the rank and "
          "every sample of the pack (file, row group, row); last checkpoint step 1")  # fmt: skip


def test_nonfinite_loss_skip_drops_the_step_and_counts_it(fx, tmp_path, monkeypatch, capsys, fault):
    _nan_at(monkeypatch, 2)
    argv = [*train_args(fx, tmp_path, total_steps=3, save_every=1), "--nonfinite_loss", "skip"]
    assert cli(argv) == 0
    assert "step 2 skipped: non-finite loss (rank 0, micro-batch 0: loss nan" in capsys.readouterr().out
    recs = records(tmp_path / "results")
    assert sorted(recs) == [1, 3] and recs[3]["nonfinite_skipped"] == 1
    exported = [
        export_checkpoint(tmp_path / "ckpt" / f"step_{s}", tmp_path / f"e{s}", weights="model", dtype=torch.float32)
        for s in (1, 2)
    ]
    one, two = (load_file(str(e / "ema.safetensors")) for e in exported)
    same = [torch.equal(one[k], two[k]) for k in one]
    assert all(same)  # the skipped step changed no weight
    fault("NaN loss at step 2, `--nonfinite_loss skip`", "exit 0; step 2 logged as skipped, not in metrics; "
          "weights after step 2 bit-identical to step 1; `nonfinite_skipped: 1` in the next record")  # fmt: skip


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(fx, tmp_path, monkeypatch, capsys, fault):
    real = ckpt_module._save_local

    def full_disk(obj, path):
        if ".step_2.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(ckpt_module, "_save_local", full_disk)
    assert cli(train_args(fx, tmp_path, total_steps=3, save_every=1)) == 3
    err = capsys.readouterr().err
    root = tmp_path / "ckpt"
    assert f"saving step 2 into {root} failed: the disk is full (" in err and "GiB free, about " in err
    assert "step_1 is complete and untouched" in err and "--auto_resume True" in err
    assert complete_steps(root) == [1] and not (root / ".step_2.tmp").exists()
    assert verify_checkpoint(root / "step_1") > 0  # still loadable
    fault("disk full while writing step 2 (ENOSPC injected)", "exit 3; message names the folder, GiB free and "
          "the size needed; partial folder removed; step_1 intact and verifies")  # fmt: skip


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(fx, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    assert cli(train_args(fx, root, total_steps=1, save_every=1)) == 0
    return root


def _copy_checkpoint(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    subprocess.run(["cp", "-a", str(saved / "ckpt"), str(target)], check=True)
    return target


@pytest.mark.parametrize("victim", ["scheduler.pt", ".metadata"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_without_running(fx, saved, tmp_path, capsys, victim, fault):
    ckpt = _copy_checkpoint(saved, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "step_1" / victim).write_bytes(pickle.dumps(_Payload(marker)))
    argv = train_args(fx, tmp_path, total_steps=2, checkpoint_dir=ckpt) + ["--auto_resume", "True"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'step_1' / victim}: refused to load" in err, err
    assert not marker.exists()  # nothing ran
    fault(f"pickle payload (`os.system`) in a checkpoint's `{victim}`, resumed with auto_resume",
          "exit 2; `error:` names the file; the payload never ran")  # fmt: skip


def test_a_link_out_of_the_checkpoint_folder_is_refused(fx, saved, tmp_path, capsys, fault):
    ckpt = _copy_checkpoint(saved, tmp_path)
    outside = tmp_path / "outside.pt"
    torch.save({"x": 1}, outside)
    (ckpt / "step_1" / "scheduler.pt").unlink()
    (ckpt / "step_1" / "scheduler.pt").symlink_to(outside)
    argv = train_args(fx, tmp_path, total_steps=2, checkpoint_dir=ckpt) + ["--auto_resume", "True"]
    assert cli(argv) == 2
    assert f"a link to {outside}, outside the checkpoint" in capsys.readouterr().err
    fault("checkpoint file replaced by a symlink out of its folder", "exit 2; refused, naming link and target")


def _torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load")
        and (ast.unparse(node.func) == "torch.load" or "from torch import load" in path.read_text())
    ]  # fmt: skip


def _weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)  # fmt: skip


def test_untrusted_files_are_never_unpickled_unrestricted_and_servers_bind_to_loopback(fault):
    """Static rules over our own code: every torch.load passes weights_only=True, no trust_remote_code, and every
    documented webserver command binds 127.0.0.1."""
    sources = [p for d in ("bagel_core", "assets", "pipelines", "bench") for p in (ROOT / d).rglob("*.py")]
    loads = [(p, call) for p in sources for call in _torch_load_calls(p)]
    unsafe = [(p, call.lineno) for p, call in loads if not _weights_only(call)]
    assert loads and not unsafe, unsafe
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]
    readme = (ROOT / "README.md").read_text()
    servers = re.findall(r"(dagster(?:-webserver| dev)[^\n`]*)", readme)
    launches = [s for s in servers if " -p " in s or " -h " in s]
    assert launches and all("-h 127.0.0.1" in s for s in launches), launches
    fault("static: `torch.load`, `trust_remote_code`, server bind addresses in the README",
          f"{len(loads)} torch.load calls all weights_only=True; no trust_remote_code; every documented "
          "server command binds 127.0.0.1")  # fmt: skip


def test_checkpoint_json_state_is_plain_data(saved):
    """train_state.json is parsed as JSON (no code), and a complete step has its marker."""
    step = saved / "ckpt" / "step_1"
    assert (step / MARKER).is_file() and json.loads((step / "train_state.json").read_text())["step"] == 1


def _crash_at(monkeypatch, point: str) -> None:
    """Make the save of step 2 die at ``point``, leaving the disk as a SIGKILL there would (no clean-up runs:
    the exception is not a disk-space error)."""

    def die(*_args, **_kwargs):
        raise RuntimeError(f"killed {point}")

    if point == "inside the DCP shard write":
        monkeypatch.setattr(ckpt_module.dcp, "save", die)
    elif point == "after the shards, before the per-rank state":
        real = ckpt_module._save_local
        monkeypatch.setattr(ckpt_module, "_save_local", lambda obj, p: die() if "rank_" in str(p) else real(obj, p))
    elif point == "after the marker, before the rename":
        real_replace = os.replace
        monkeypatch.setattr(
            ckpt_module.os, "replace", lambda a, b: die() if str(a).endswith(".step_2.tmp") else real_replace(a, b)
        )


@pytest.mark.parametrize(
    "point",
    [
        "inside the DCP shard write",
        "after the shards, before the per-rank state",
        "after the marker, before the rename",
    ],
)
def test_a_save_killed_at_any_point_is_never_used_and_the_previous_step_is(
    fx, saved, tmp_path, monkeypatch, point, fault
):
    ckpt = _copy_checkpoint(saved, tmp_path)
    argv = [*train_args(fx, tmp_path, total_steps=2, save_every=1, checkpoint_dir=ckpt), "--auto_resume", "True"]
    _crash_at(monkeypatch, point)
    with pytest.raises(RuntimeError, match="killed"):
        cli(argv)
    monkeypatch.undo()
    assert complete_steps(ckpt) == [1] and (ckpt / ".step_2.tmp").is_dir()  # the partial save is left, unused
    assert cli(argv) == 0  # auto_resume takes step_1 and redoes step 2
    assert complete_steps(ckpt) == [1, 2] and not (ckpt / ".step_2.tmp").exists()
    assert json.loads((ckpt / "step_2" / "train_state.json").read_text())["step"] == 2
    fault(f"save of step 2 killed {point}", "step_2 never appears; auto_resume continues from step_1, redoes step 2 "
          "and replaces the partial folder")  # fmt: skip
