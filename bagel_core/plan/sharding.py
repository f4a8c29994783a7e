"""Upstream's sharding: which data units each rank and DataLoader worker reads (data-format.md 12).

The manifest (``bagel data plan``) and the training loader both call these functions, so what the
plan shows is what training reads. Units per group:

* ``t2i_pretrain``: one parquet **file** (a file listed twice by ``num_used_data`` is two units);
* ``unified_edit``: one (parquet file, row group) for every row group of each selected file that
  ``parquet_info`` lists (``num_used_data`` counts *files*);
* ``vlm_sft``: one JSONL **line** (with its image root); optionally shuffled with ``shuffle_seed``
  before truncation to ``num_used_data`` lines (never repeated).

Split (``set_epoch(seed)``): sort units (strings, or tuples field by field; VLM by the raw line text),
``random.Random(seed).shuffle``, rank r takes ``[r*n_r, (r+1)*n_r)`` with n_r = U // world_size (the
remainder is dropped); worker w takes ``[w*n_w, (w+1)*n_w)`` of its rank's list with
n_w = n_r // num_workers, **reversed**; ``num_workers = 0`` means the rank's list, unreversed, worker 0.

One deliberate deviation: upstream lists ``data_dir`` with ``os.listdir`` (filesystem order), which
only decides *which* files survive when ``num_used_data`` is smaller than the file count; we use the
sorted listing (``DatasetEntry.parquet_files``) so the choice is the same on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bagel_core.config.dataset_config import DatasetConfig, GroupConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.registry import DatasetEntry, Registry

DEFAULT_DATA_SEED = 42
UNIT_NAMES = {"t2i": "files", "edit": "row groups", "vlm": "lines"}


@dataclass(frozen=True)
class DataUnit:
    """One unit of sharding. ``row_group`` is set for edit units, ``line`` for VLM units (else -1).

    ``sort_key`` is what upstream compares when sorting: the path (T2I), (path, row group) (edit),
    (raw JSONL line incl. newline, image root) (VLM).
    """

    group: str
    dataset: str
    source_file: str
    row_group: int = -1
    line: int = -1
    sort_key: tuple = field(default=(), compare=False, repr=False)
    # (size in bytes, mtime in ns) of source_file when the plan was made: the loader notices a file changed since
    identity: tuple[int, int] | None = field(default=None, compare=False, repr=False)


@dataclass
class GroupUnits:
    """A group's listed units plus what the listing dropped or repeated (for reports)."""

    group: str
    task: str
    units: list[DataUnit]
    notes: list[str] = field(default_factory=list)


def take_num_used(items: Sequence[Any], num_used: int, where: str) -> list[Any]:
    """Upstream's parquet selection: repeat the list floor(num/len)+1 times, keep the first ``num_used``."""
    if not items:
        raise DataError(f"{where}: no parquet files found (upstream would divide by zero); check data_dir")
    repeated = list(items) * (num_used // len(items) + 1)
    return repeated[:num_used]


def load_parquet_info(entry: DatasetEntry) -> dict[str, int]:
    """``{path: num_row_groups}`` from the entry's ``parquet_info`` JSON, or from parquet footers.

    Upstream requires ``parquet_info_path`` for edit groups; without it we read the footers (and say so
    in the notes), which is what a generated ``parquet_info`` would contain.
    """
    if entry.parquet_info_path is not None:
        path = Path(entry.parquet_info_path)
        if not path.is_file():
            raise ConfigError(f"{entry.group}.{entry.name}.parquet_info_path: {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg})") from exc
        out = {}
        for key, value in raw.items():
            if not isinstance(value, dict) or not isinstance(value.get("num_row_groups"), int):
                raise ConfigError(f"{path}: entry {key!r} needs an integer 'num_row_groups'")
            out[key] = value["num_row_groups"]
        return out
    return {str(p): groups for p in entry.parquet_files() if (groups := readable_row_groups(p)) is not None}


def readable_row_groups(path: str | Path) -> int | None:
    """Row groups from the footer, or None when the file cannot be opened (truncated, not parquet)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception:  # noqa: BLE001 - any reader error: the index quarantines such a file as file_unreadable
        return None


def list_group_units(group: GroupConfig, registry: Registry) -> GroupUnits:
    """All units of one group in upstream's listing order (before sorting)."""
    units: list[DataUnit] = []
    notes: list[str] = []
    for name, num_used in zip(group.dataset_names, group.num_used_data):
        entry = registry.get(group.group, name)
        where = f"{group.group}.{name}"
        if group.task in ("t2i", "edit"):
            files = [str(Path(entry.data_dir) / p.name) for p in entry.parquet_files()]
            chosen = take_num_used(files, num_used, f"{where} (data_dir {entry.data_dir})")
            if num_used > len(files):
                notes.append(f"{where}: num_used_data {num_used} > {len(files)} files: files repeated")
            elif num_used < len(files):
                notes.append(f"{where}: num_used_data {num_used} < {len(files)} files: {len(files) - num_used} unused")
            if group.task == "t2i":
                unreadable = sorted({f for f in chosen if readable_row_groups(f) is None})
                if unreadable:
                    notes.append(
                        f"{where}: {len(unreadable)} unreadable file(s) left out (the index quarantines them as "
                        f"file_unreadable), e.g. {unreadable[0]}"
                    )
                units += [DataUnit(group.group, name, f, sort_key=(f,)) for f in chosen if f not in unreadable]
                continue
            info = load_parquet_info(entry)
            if entry.parquet_info_path is None:
                notes.append(f"{where}: no parquet_info_path; row-group counts read from parquet footers")
            missing = sorted({f for f in chosen if f not in info})
            if missing:
                notes.append(
                    f"{where}: {len(missing)} file(s) not in parquet_info are dropped as upstream does "
                    f"(keys must equal data_dir/filename exactly), e.g. {missing[0]}"
                )
            for f in chosen:
                for rg in range(info.get(f, 0)):
                    units.append(DataUnit(group.group, name, f, row_group=rg, sort_key=(f, rg)))
        else:
            if entry.jsonl_path is None:
                raise ConfigError(f"{where}: vlm_sft entries need 'jsonl_path'")
            with open(entry.jsonl_path, "r", encoding="utf-8") as handle:
                lines = handle.readlines()
            order = list(range(len(lines)))
            if group.shuffle_lines:
                rng = random.Random()
                rng.seed(group.shuffle_seed)
                rng.shuffle(order)  # same permutation upstream applies to the line list itself
            if num_used > len(lines):
                notes.append(f"{where}: num_used_data {num_used} > {len(lines)} lines: lines are never repeated")
            image_root = str(entry.data_dir)
            units += [
                DataUnit(group.group, name, str(entry.jsonl_path), line=i, sort_key=(lines[i], image_root))
                for i in order[:num_used]
            ]
    return GroupUnits(group.group, group.task, units, notes)


def shuffled_units(units: Sequence[DataUnit], seed: int = DEFAULT_DATA_SEED) -> list[DataUnit]:
    """Sort by upstream's key (stable), then shuffle with a private ``random.Random(seed)``."""
    ordered = sorted(units, key=lambda u: u.sort_key)
    random.Random(seed).shuffle(ordered)
    return ordered


def rank_slice(shuffled: Sequence[DataUnit], world_size: int, rank: int) -> list[DataUnit]:
    """Rank ``rank``'s units; the last ``U % world_size`` units belong to nobody."""
    per_rank = len(shuffled) // world_size
    return list(shuffled[rank * per_rank : (rank + 1) * per_rank])


def worker_slice(rank_units: Sequence[DataUnit], num_workers: int, worker: int) -> list[DataUnit]:
    """Worker ``worker``'s units of its rank, reversed; ``num_workers = 0``: the whole list as is."""
    if num_workers == 0:
        return list(rank_units)
    per_worker = len(rank_units) // num_workers
    return list(rank_units[worker * per_worker : (worker + 1) * per_worker])[::-1]


def slots(world_size: int, num_workers: int) -> int:
    """How many (rank, worker) readers each group feeds."""
    return world_size * max(num_workers, 1)


def capacity_problem(group: str, task: str, num_units: int, world_size: int, num_workers: int) -> str | None:
    """The empty-worker rule (12.3) for one group; ``None`` when every worker gets at least one unit."""
    needed = slots(world_size, num_workers)
    if num_units >= needed:
        return None
    unit = UNIT_NAMES[task]
    per_rank = num_units // world_size
    per_worker = per_rank // max(num_workers, 1)
    if task == "t2i":
        fix = f"raise num_used_data of {group} to >= {needed} (files are repeated)"
    elif task == "edit":
        fix = f"raise num_used_data of {group} (it counts files; each brings its row groups) or write more row groups"
    else:
        fix = f"add lines (num_used_data truncates, never repeats) so {group} has >= {needed}"
    if per_rank >= 1:
        fix += f", or use --num-workers <= {per_rank}"
    else:
        fix += f", or use at most {num_units} rank(s)"
    return (
        f"{group}: {num_units} {unit} for world_size {world_size} x num_workers {num_workers} = {needed} readers: "
        f"{per_rank} per rank, {per_worker} per worker, so some worker gets no data and training hangs. "
        f"Fix: {fix}."
    )


def check_capacity(
    config: DatasetConfig, listings: dict[str, GroupUnits], world_size: int, num_workers: int
) -> list[str]:
    """Every group's problem message (empty when all groups satisfy units >= ranks x workers)."""
    if world_size < 1 or num_workers < 0:
        raise ConfigError(f"world_size must be >= 1 and num_workers >= 0, got {world_size}, {num_workers}")
    problems = []
    for name, group in config.groups.items():
        problem = capacity_problem(name, group.task, len(listings[name].units), world_size, num_workers)
        if problem:
            problems.append(problem)
    return problems
