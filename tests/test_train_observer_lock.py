"""The trainer tells an observer about its run (start, steps, complete checkpoints, export, end), a broken
observer never stops training, and one checkpoint folder holds one training at a time (stale locks recovered)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packed_fixtures import small_fixture
from train_fixtures import train_args

from bagel_core.config.errors import ConfigError
from bagel_core.train.__main__ import cli
from bagel_core.train.checkpoint import MARKER
from bagel_core.train.lock import LOCK_FILE, CheckpointDirLock, check_free, check_writable, live_holder
from bagel_core.train.observer import GuardedObserver, NullObserver, load_observer

EVENTS: list[tuple] = []


class Recorder:
    """An observer that records what it is told (and whether each checkpoint was complete when announced)."""

    def on_start(self, info):
        EVENTS.append(("start", info))

    def on_log(self, record):
        EVENTS.append(("log", record["step"]))

    def on_checkpoint(self, step, path):
        EVENTS.append(("checkpoint", step, (Path(path) / MARKER).is_file(), (Path(path).parent / LOCK_FILE).is_file()))

    def on_export(self, path):
        EVENTS.append(("export", Path(path).name, (Path(path) / "ema.safetensors").is_file()))

    def close(self, error):
        EVENTS.append(("close", error))


class Broken(Recorder):
    def on_log(self, record):
        raise RuntimeError("report channel down")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("observer") / "data")


def test_rank0_reports_each_event_once_and_in_order(fx, tmp_path):
    EVENTS.clear()
    assert cli([*train_args(fx, tmp_path, total_steps=2, save_every=1), "--observer", f"{__name__}:Recorder"]) == 0
    kinds = [e[0] for e in EVENTS]
    assert kinds == ["start", "log", "checkpoint", "log", "checkpoint", "export", "close"], EVENTS
    start = EVENTS[0][1]
    assert start["step"] == 0 and start["total_steps"] == 2 and start["world_size"] == 1
    assert start["wandb_url"] is None  # W&B disabled in tests: no page to link
    assert [e[1:] for e in EVENTS if e[0] == "checkpoint"] == [(1, True, True), (2, True, True)]
    assert EVENTS[-2] == ("export", "step_final", True) and EVENTS[-1] == ("close", None)
    assert not (tmp_path / "ckpt" / LOCK_FILE).exists()  # released at the end


def test_a_failing_observer_is_reported_once_and_training_goes_on(fx, tmp_path, capsys):
    EVENTS.clear()
    assert cli([*train_args(fx, tmp_path, total_steps=2), "--observer", f"{__name__}:Broken"]) == 0
    assert [e[0] for e in EVENTS] == ["start"]  # silenced after its first failure
    err = capsys.readouterr().err
    assert err.count("training observer failed in on_log (RuntimeError: report channel down)") == 1


def test_observer_specs_are_checked():
    assert isinstance(load_observer(""), NullObserver)
    with pytest.raises(ConfigError, match="expected module:attribute"):
        load_observer("no_colon_here")
    with pytest.raises(ConfigError, match="cannot import it"):
        load_observer("bagel_core.nowhere:Thing")
    with pytest.raises(ConfigError, match="lacks on_start"):
        load_observer("builtins:object")
    guarded = GuardedObserver(Broken())
    guarded.on_log({"step": 1})  # swallowed
    guarded.on_start({})  # and from now on nothing reaches it
    assert guarded.inner is None


def _holder(tmp_path: Path, pid: int, launch: str = "") -> Path:
    root = tmp_path / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    lock = {"host": socket.gethostname(), "pid": pid, "started": time.time(), "launch": launch, "command": "train"}
    (root / LOCK_FILE).write_text(json.dumps(lock))
    return root


def test_a_live_holder_keeps_a_second_training_out_naming_it(fx, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = _holder(tmp_path, sleeper.pid)
        assert cli(train_args(fx, tmp_path, total_steps=1)) == 2
        err = capsys.readouterr().err
        assert f"--checkpoint_dir {root} is in use by another training: pid {sleeper.pid}" in err
        assert "delete" in err and LOCK_FILE in err
        assert cli([*train_args(fx, tmp_path, total_steps=1), "--dry_run", "True"]) == 2  # the dry run says so too
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not list(root.glob("step_*"))


def test_a_stale_lock_of_a_killed_run_is_replaced(fx, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = _holder(tmp_path, dead.pid)
    assert live_holder(root) is None
    assert cli(train_args(fx, tmp_path, total_steps=1, save_every=1)) == 0
    assert f"replaced a stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert (root / "step_1" / MARKER).is_file() and not (root / LOCK_FILE).exists()


def test_the_lock_of_the_same_launch_is_not_a_conflict(tmp_path, monkeypatch):
    root = _holder(tmp_path, os.getppid(), launch="launch-1")  # rank 0 of this launch holds it
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    check_free(root)  # another rank of the same torchrun checking after rank 0 took it
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    with pytest.raises(ConfigError, match="in use by another training"):
        check_free(root)
    with pytest.raises(ConfigError, match="in use by another training"), CheckpointDirLock(root):
        pass


def test_checkpoint_dir_must_be_a_writable_folder(tmp_path):
    check_writable(tmp_path / "not" / "yet" / "there")  # creatable: fine, and nothing is created
    assert not (tmp_path / "not").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "ckpt")
