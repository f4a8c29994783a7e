"""The training side of Dagster Pipes: rank 0 of ``torchrun -m bagel_core.train --observer
assets.pipes_observer:PipesObserver`` reports the run's events to the ``training_run`` step.

Runs inside the training processes, so it imports only ``dagster_pipes`` (no dependencies, no Dagster).
Events travel as Pipes custom messages (``{"event": "checkpoint", "step": 8, "path": ...}``); the
orchestrator turns each checkpoint message into one ``checkpoint`` partition while training goes on.
Only rank 0 ever builds this object (the trainer sees to it), so there is exactly one Pipes writer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes

# metrics forwarded with each logged step (the full record stays in metrics.jsonl and W&B)
LOGGED_KEYS = ("step", "loss", "ce", "mse", "lr", "grad_norm", "tokens_per_sec", "mfu", "peak_mem_mib")


class PipesObserver:
    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.pipes: PipesContext = self._stack.enter_context(open_dagster_pipes())

    def _send(self, event: str, **payload: Any) -> None:
        self.pipes.report_custom_message({"event": event, **payload})

    def on_start(self, info: dict[str, Any]) -> None:
        self._send("start", **info)

    def on_log(self, record: dict[str, Any]) -> None:
        self._send("log", **{k: record[k] for k in LOGGED_KEYS if k in record})

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._send("checkpoint", step=int(step), path=str(Path(path).absolute()))

    def on_export(self, path: Path) -> None:
        self._send("export", path=str(Path(path).absolute()))

    def close(self, error: BaseException | None) -> None:
        if error is not None:
            self._send("error", error=f"{type(error).__name__}: {error}")
        self._stack.close()
