"""One training per checkpoint folder: a lock file that names its holder and recovers from a killed one.

Two runs writing ``step_<N>`` into the same folder would overwrite each other's shards and resume from a
mixture. Rank 0 creates ``<checkpoint_dir>/.bagel-train.lock`` exclusively (``O_CREAT | O_EXCL``) with
its host, pid, start time and command, and removes it when training ends. A lock left by a process that
no longer exists on this host is stale: it is reported and replaced. A lock from another host cannot be
checked from here, so it is respected until someone removes it (the error says how).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Self

from bagel_core.config.errors import ConfigError
from bagel_core.config.processes import pid_alive

LOCK_FILE = ".bagel-train.lock"


def read_holder(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The lock's content, or None when there is no lock (an unreadable lock reads as an unknown holder)."""
    path = Path(checkpoint_dir) / LOCK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "unreadable": str(path)}


def is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))


def launch_id() -> str:
    """The torchrun launch this process belongs to (the same on every rank and node), or "" outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def live_holder(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The holder of a lock that is still in force, else None. A lock taken by this same launch (rank 0 of the
    torchrun whose other ranks are checking) is not a conflict."""
    holder = read_holder(checkpoint_dir)
    if holder is None or is_stale(holder) or (launch_id() and holder.get("launch") == launch_id()):
        return None
    return holder


def describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {when} ({holder.get('command', '?')})"


def check_writable(checkpoint_dir: str | Path) -> None:
    """``checkpoint_dir``, or the nearest folder above it that exists, is a folder this user can write in
    (checked without creating anything, so ``--dry_run`` leaves no trace)."""
    root = Path(checkpoint_dir).absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--checkpoint_dir {root}: {existing} is a file, not a folder; pick another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--checkpoint_dir {root}: {existing} is not writable by this user; pick another folder")


def check_free(checkpoint_dir: str | Path) -> None:
    """Raise when another live training holds ``checkpoint_dir``."""
    holder = live_holder(checkpoint_dir)
    if holder is not None:
        raise ConfigError(
            f"--checkpoint_dir {checkpoint_dir} is in use by another training: {describe(holder)}; wait for it, use "
            f"another --checkpoint_dir, or delete {Path(checkpoint_dir) / LOCK_FILE} if that run is gone"
        )


class CheckpointDirLock:
    """Context manager held by rank 0 for the whole training."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.root = Path(checkpoint_dir)
        self.path = self.root / LOCK_FILE
        self.stale_note: str | None = None

    def acquire(self) -> None:
        check_writable(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        content = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "launch": launch_id(),
                "command": " ".join(sys.argv),
            }
        )
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.root)
                if holder is not None and not is_stale(holder):
                    check_free(self.root)  # raises, naming the holder
                self.stale_note = f"replaced a stale lock of {describe(holder or {})}"
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
            return
        raise ConfigError(f"could not take {self.path}: another process keeps creating it")

    def release(self) -> None:
        holder = read_holder(self.root)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
