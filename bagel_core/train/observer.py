"""Training events for whoever launched the run (an orchestrator, a notebook, a test), without the trainer
knowing who that is.

Rank 0 calls one observer at the moments an outside process cares about: the run started (and where its
W&B page is), a step was logged, a checkpoint is complete on disk, the inference-ready export is written,
the run ended. ``--observer module:attribute`` names a factory (a class or function with no arguments)
that returns the observer; Dagster's ``training_run`` passes ``assets.pipes_observer:PipesObserver``,
which reports the events through Dagster Pipes. The dependency points one way: this package defines the
protocol, the orchestration package implements it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Protocol

from bagel_core.config.errors import ConfigError


class TrainingObserver(Protocol):
    def on_start(self, info: dict[str, Any]) -> None:
        """After the models are built and any checkpoint restored: step, total_steps, world size, W&B URL."""

    def on_log(self, record: dict[str, Any]) -> None:
        """Each logged step's ``metrics.jsonl`` record."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """``path`` is a complete step directory (its marker written): safe to load, copy or evaluate."""

    def on_export(self, path: Path) -> None:
        """The inference-ready ``step_final`` is complete."""

    def close(self, error: BaseException | None) -> None:
        """Last call, also when training failed (``error`` is then the exception)."""


class NullObserver:
    """What every rank but 0, and a run without ``--observer``, reports to."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_log(self, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_export(self, path: Path) -> None:
        pass

    def close(self, error: BaseException | None) -> None:
        pass


class GuardedObserver:
    """Passes every event on; a failing observer is reported once on stderr and then left alone, so a broken
    report channel never stops a training (the launcher still finds complete checkpoints on disk)."""

    def __init__(self, inner: TrainingObserver) -> None:
        self.inner: TrainingObserver | None = inner

    def _call(self, name: str, *args: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, name)(*args)
        except Exception as exc:  # noqa: BLE001 - reporting must never end a training
            print(f"warning: training observer failed in {name} ({type(exc).__name__}: {exc}); no further events "
                  "are reported to it", file=sys.stderr)  # fmt: skip
            self.inner = None

    def on_start(self, info: dict[str, Any]) -> None:
        self._call("on_start", info)

    def on_log(self, record: dict[str, Any]) -> None:
        self._call("on_log", record)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._call("on_checkpoint", step, path)

    def on_export(self, path: Path) -> None:
        self._call("on_export", path)

    def close(self, error: BaseException | None) -> None:
        self._call("close", error)


def load_observer(spec: str) -> TrainingObserver:
    """Import ``module:attribute`` and call it; an empty spec gives the null observer."""
    if not spec:
        return NullObserver()
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"--observer {spec!r}: expected module:attribute, e.g. assets.pipes_observer:PipesObserver")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--observer {spec!r}: cannot import it ({exc}); is that package installed?") from exc
    observer = factory()
    missing = [m for m in ("on_start", "on_log", "on_checkpoint", "on_export", "close") if not hasattr(observer, m)]
    if missing:
        raise ConfigError(f"--observer {spec!r}: the object it returns lacks {', '.join(missing)}")
    return observer
