"""In-order unit results over a fork-server process pool, or threads when there is little work."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from typing import Self

import pyarrow as pa

from bagel_core.index.schema import IndexOptions
from bagel_core.index.units import Unit, crashed_rows, index_unit


def _mp_context() -> BaseContext:
    """``forkserver`` preloaded with the unit code where available, else ``spawn``.

    Never plain ``fork``: the caller may be a threaded Dagster step process or hold DuckDB/Arrow
    native threads. The fork server imports the unit code once, so each worker starts in milliseconds.
    """
    try:
        ctx = get_context("forkserver")
    except ValueError:  # pragma: no cover - platforms without fork
        return get_context("spawn")
    ctx.set_forkserver_preload(["bagel_core.index.units"])
    return ctx


def _warm_up() -> None:
    """No-op task: makes the pool start its workers."""


def _work(unit: Unit) -> int:
    """Rough cost of a unit in rows, counting 10 KB of (uncompressed) row-group data as one more row
    (JSONL: a line per 256 bytes); decides whether a process pool pays off."""
    if unit.kind == "parquet":
        rows = unit.num_rows if unit.only_rows is None else len(unit.only_rows)
        return rows + sum(unit.row_group_bytes) // 10_000
    return (unit.end - unit.start) // 256 + 1


def _done(value: pa.Table) -> Future[pa.Table]:
    fut: Future[pa.Table] = Future()
    fut.set_result(value)
    return fut


class Pool:
    """In-order results over a process pool with a bounded number of units in flight.

    Workers come from a fork server (safe inside Dagster's threaded step process) and only when
    there is enough work (``min_rows_for_pool``): starting them costs ~0.4 s of a core. Less work,
    and the units submitted while the workers start, are indexed in this process on ``workers``
    threads (Arrow's parquet decoding and most numpy work release the GIL, so reading one unit
    overlaps checking another). A worker that dies (a decoder segfault, the OOM killer) breaks the
    pool: the pool is rebuilt, the unit is retried alone, and if it kills its worker again its rows
    are quarantined as ``worker_crashed``.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        self._starter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the workers in a background thread so their start-up (~0.4 s) overlaps other work."""
        if self.executor is None and self._starter is None and self.workers > 1:
            self._starter = threading.Thread(target=self._start, name="index-pool-start", daemon=True)
            self._starter.start()

    def _start(self) -> None:
        executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context())
        for _ in range(self.workers):
            executor.submit(_warm_up)
        with self._lock:
            if not self._closed:
                self.executor = executor
                return
        executor.shutdown(wait=True, cancel_futures=True)  # closed while starting: nobody will use it

    def _ready(self) -> ProcessPoolExecutor | None:
        with self._lock:
            return self.executor

    def map(self, units: list[Unit], opts: IndexOptions) -> Iterator[tuple[Unit, pa.Table]]:
        units = list(units)
        if self.workers > 1 and len(units) > 1 and sum(_work(u) for u in units) >= opts.min_rows_for_pool:
            self.start()
        if self._starter is not None:
            self._starter.join(timeout=0.1)  # a spawn pool is up by now; a fork server takes ~0.4 s
        threads = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="index-unit")
            if self.workers > 1 and self._starter is None
            else None
        )
        pending: deque[tuple[Unit, Future[pa.Table], bool]] = deque()  # (unit, result, in a worker process)
        limit = 2 * self.workers + 2
        it = iter(units)
        try:
            while True:
                while len(pending) < limit:
                    unit = next(it, None)
                    if unit is None:
                        break
                    if self._ready() is not None:
                        pending.append((unit, self._submit(unit, opts), True))
                    elif self._starter is not None and self._starter.is_alive():
                        # workers are starting: index here, one unit at a time, then look again
                        pending.append((unit, _done(index_unit(unit, opts)), False))
                        break
                    elif threads is not None:
                        pending.append((unit, threads.submit(index_unit, unit, opts), False))
                    else:
                        pending.append((unit, _done(index_unit(unit, opts)), False))
                if not pending:
                    return
                unit, fut, remote = pending.popleft()
                try:
                    table = fut.result()
                except BrokenProcessPool:
                    if not remote:
                        raise
                    table = self._recover(unit, opts)
                    # every other in-flight unit died with the pool: resubmit them to the new one
                    pending = deque((u, self._submit(u, opts), True) if r else (u, f, r) for u, f, r in pending)
                yield unit, table
        finally:
            if threads is not None:
                threads.shutdown(wait=True, cancel_futures=True)

    def _submit(self, unit: Unit, opts: IndexOptions) -> Future[pa.Table]:
        """Submit a unit; a pool that broke meanwhile gives a failed future (recovered in turn by :meth:`map`)."""
        assert self.executor is not None
        try:
            return self.executor.submit(index_unit, unit, opts)
        except BrokenProcessPool as exc:
            fut: Future[pa.Table] = Future()
            fut.set_exception(exc)
            return fut

    def _recover(self, unit: Unit, opts: IndexOptions) -> pa.Table:
        assert self.executor is not None
        self.executor.shutdown(wait=True, cancel_futures=True)
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=_mp_context()) as alone:
                table = alone.submit(index_unit, unit, opts).result()
        except BrokenProcessPool:
            table = crashed_rows(unit)
        self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context())
        return table

    def close(self) -> None:
        """Shut the workers down; a pool still starting shuts itself down when it is up (no waiting)."""
        with self._lock:
            self._closed = True
            executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
