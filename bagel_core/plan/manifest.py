"""Sampling manifest (who reads what) and the packing simulation over it.

Why: before launching, users should see which rank and worker read which files/rows, whether every
worker gets data (upstream hangs otherwise), and how the data will pack. The manifest is the
training loader's input: :func:`read_manifest` gives one worker its units in reading order.

Files written by :func:`write_manifest` in ``out_dir``:

* ``manifest.parquet``: one row per (group, rank, worker, position) with the unit (``source_file``,
  ``row_group`` for edit, ``line`` for VLM) in the order the worker reads it;
* ``manifest.json``: inputs (world size, workers, seed, config paths and hashes, the index), per-group
  unit counts, what was dropped at rank and worker level, listing notes, ``problems`` (non-empty =
  some worker would get no data; the reader refuses such a manifest), the packing mode the plan was
  simulated with (``packing``; the assignment itself does not depend on it) and ``quarantine``
  (counts, or ``null`` when planned without an index);
* ``quarantine.parquet``: when planned with an index, the index's quarantined samples of the configured
  datasets (:mod:`bagel_core.plan.quarantine`): the training loader skips them without reading them.

The packing simulation (:func:`simulate_packing`) replays the packer per (rank, worker) over the
samples of its units, using the cost variants of ``token_stats.parquet``, in the packing mode chosen
(:mod:`bagel_core.plan.packing`), and reports per group what became of the samples drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bagel_core.config.dataset_config import DatasetConfig
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.registry import Registry
from bagel_core.plan.packing import (
    CARRY,
    FATES,
    PACKING_MODES,
    CfgDropout,
    PackingParams,
    SimSample,
    WorkerSimulation,
    simulate_worker,
)
from bagel_core.plan.quarantine import (
    QUARANTINE_FILE,
    Quarantine,
    read_index_quarantine,
    summarise,
    write_quarantine,
)
from bagel_core.plan.sharding import (
    DataUnit,
    GroupUnits,
    check_capacity,
    list_group_units,
    rank_slice,
    shuffled_units,
    worker_slice,
)

MANIFEST_FILE = "manifest.parquet"
MANIFEST_JSON = "manifest.json"
SIMULATION_JSON = "packing_simulation.json"
MANIFEST_VERSION = 1


class ManifestCapacityError(ConfigError):
    """Some group has fewer units than ranks x workers: a worker would get no data."""


@dataclass
class Manifest:
    """Assignments per (group, rank, worker) plus the per-group accounting."""

    world_size: int
    num_workers: int
    seed: int
    assignments: dict[tuple[str, int, int], list[DataUnit]]
    groups: dict[str, dict[str, Any]]
    problems: list[str]
    inputs: dict[str, Any] = field(default_factory=dict)
    packing: str = CARRY
    quarantine: pa.Table | None = None  # the index's quarantined samples of the configured datasets

    @property
    def workers(self) -> list[int]:
        return list(range(max(self.num_workers, 1)))


def _sha256(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_manifest(
    dataset_config: DatasetConfig,
    registry: Registry,
    world_size: int,
    num_workers: int,
    seed: int = 42,
    strict: bool = True,
    packing: str = CARRY,
    index: str | Path | None = None,
) -> Manifest:
    """List, sort, shuffle and split every group's units (12.1, 12.2) and check the 12.3 rule.

    ``strict``: raise :class:`ManifestCapacityError` naming the numbers and the fix when any worker
    would get no data; otherwise record the problems (the Dagster check blocks on them). ``packing``:
    the mode the plan is simulated with, recorded only. ``index``: the index whose quarantined samples
    of the configured datasets the manifest carries to the training loader (``None``: none).
    """
    if packing not in PACKING_MODES:
        raise ConfigError(f"packing mode {packing!r} is unknown: use one of {', '.join(PACKING_MODES)}")
    dataset_config.check_against(registry)
    listings: dict[str, GroupUnits] = {name: list_group_units(g, registry) for name, g in dataset_config.groups.items()}
    _stamp_identities(listings)
    problems = check_capacity(dataset_config, listings, world_size, num_workers)
    if problems and strict:
        raise ManifestCapacityError("some workers would get no data:\n  " + "\n  ".join(problems))
    assignments: dict[tuple[str, int, int], list[DataUnit]] = {}
    groups: dict[str, dict[str, Any]] = {}
    workers = range(max(num_workers, 1))
    for name, listing in listings.items():
        shuffled = shuffled_units(listing.units, seed)
        per_rank = len(shuffled) // world_size
        per_worker = per_rank // num_workers if num_workers else per_rank
        for rank in range(world_size):
            mine = rank_slice(shuffled, world_size, rank)
            for worker in workers:
                assignments[(name, rank, worker)] = worker_slice(mine, num_workers, worker)
        group = dataset_config.groups[name]
        groups[name] = {
            "task": listing.task,
            "datasets": list(group.dataset_names),
            "num_used_data": list(group.num_used_data),
            "units": len(listing.units),
            "distinct_units": len(set(listing.units)),
            "per_rank": per_rank,
            "per_worker": per_worker,
            "dropped_at_rank_level": len(shuffled) - per_rank * world_size,
            "dropped_at_worker_level": (per_rank - per_worker * num_workers) * world_size if num_workers else 0,
            "weight": group.weight,
            "is_mandatory": group.is_mandatory,
            "notes": listing.notes,
        }
    inputs = {
        "registry": str(registry.source) if registry.source else None,
        "registry_sha256": _sha256(registry.source),
        "dataset_config": str(dataset_config.source) if dataset_config.source else None,
        "dataset_config_sha256": _sha256(dataset_config.source),
        "index": str(index) if index is not None else None,
    }
    quarantine = None
    if index is not None:
        pairs = [(name, d) for name, g in dataset_config.groups.items() for d in g.dataset_names]
        quarantine = read_index_quarantine(index, pairs)
    return Manifest(world_size, num_workers, seed, assignments, groups, problems, inputs, packing, quarantine)


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _stamp_identities(listings: dict[str, GroupUnits]) -> None:
    """Record each unit's file identity now, so training can tell a file rewritten, truncated or deleted since."""
    seen: dict[str, tuple[int, int] | None] = {}
    for listing in listings.values():
        for i, unit in enumerate(listing.units):
            if unit.source_file not in seen:
                seen[unit.source_file] = file_identity(unit.source_file)
            listing.units[i] = replace(unit, identity=seen[unit.source_file])


def write_manifest(manifest: Manifest, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``manifest.parquet``, ``manifest.json`` and, planned with an index, ``quarantine.parquet``
    (deterministic bytes for the same inputs; a quarantine list of an earlier plan is removed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if manifest.quarantine is not None:
        write_quarantine(manifest.quarantine, out)
    else:
        (out / QUARANTINE_FILE).unlink(missing_ok=True)
    cols: dict[str, list] = defaultdict(list)
    for (group, rank, worker), units in sorted(manifest.assignments.items(), key=lambda kv: kv[0][1:] + (kv[0][0],)):
        for position, unit in enumerate(units):
            for key, value in (
                ("group", group),
                ("task", manifest.groups[group]["task"]),
                ("dataset", unit.dataset),
                ("rank", rank),
                ("worker", worker),
                ("position", position),
                ("source_file", unit.source_file),
                ("row_group", unit.row_group),
                ("line", unit.line),
                ("file_size", unit.identity[0] if unit.identity else -1),
                ("file_mtime_ns", unit.identity[1] if unit.identity else -1),
            ):
                cols[key].append(value)
    schema = pa.schema(
        [
            ("group", pa.string()),
            ("task", pa.string()),
            ("dataset", pa.string()),
            ("rank", pa.int32()),
            ("worker", pa.int32()),
            ("position", pa.int64()),
            ("source_file", pa.string()),
            ("row_group", pa.int32()),
            ("line", pa.int64()),
            ("file_size", pa.int64()),
            ("file_mtime_ns", pa.int64()),
        ]
    )
    table = pa.table({name: cols.get(name, []) for name in schema.names}, schema=schema)
    pq.write_table(table, out / MANIFEST_FILE)
    meta = {
        "version": MANIFEST_VERSION,
        "world_size": manifest.world_size,
        "num_workers": manifest.num_workers,
        "seed": manifest.seed,
        "ok": not manifest.problems,
        "problems": manifest.problems,
        "groups": manifest.groups,
        "inputs": manifest.inputs,
        "rows": table.num_rows,
        "packing": manifest.packing,
        "quarantine": summarise(manifest.quarantine) if manifest.quarantine is not None else None,
    }
    (out / MANIFEST_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out / MANIFEST_FILE, out / MANIFEST_JSON


def read_manifest_meta(manifest_dir: str | Path) -> dict[str, Any]:
    path = Path(manifest_dir) / MANIFEST_JSON
    if not path.is_file():
        raise DataError(f"no manifest at {manifest_dir} (missing {MANIFEST_JSON}); run `bagel data plan`")
    return json.loads(path.read_text())


def read_manifest_quarantine(manifest_dir: str | Path) -> Quarantine | None:
    """The quarantine list a manifest carries; ``None`` when it was planned without an index."""
    meta = read_manifest_meta(manifest_dir)
    if meta.get("quarantine") is None:
        return None
    path = Path(manifest_dir) / QUARANTINE_FILE
    if not path.is_file():
        raise DataError(
            f"{manifest_dir}: manifest.json lists {meta['quarantine']['samples']} quarantined sample(s) but "
            f"{QUARANTINE_FILE} is missing; re-run `bagel data plan`"
        )
    return Quarantine.read(path)


def read_manifest(
    manifest_dir: str | Path,
    rank: int,
    worker: int,
    world_size: int | None = None,
    num_workers: int | None = None,
) -> dict[str, list[DataUnit]]:
    """The units one worker reads, per group, in reading order (what the training loader consumes).

    ``world_size``/``num_workers``, when given, must match the manifest (a resume-state mismatch
    otherwise). A manifest with capacity problems is refused.
    """
    meta = read_manifest_meta(manifest_dir)
    if meta.get("problems"):
        raise ManifestCapacityError(
            f"{manifest_dir}: manifest has empty workers; rebuild it:\n  " + "\n  ".join(meta["problems"])
        )
    for name, given in (("world_size", world_size), ("num_workers", num_workers)):
        if given is not None and given != meta[name]:
            raise ConfigError(
                f"{manifest_dir}: manifest was built for {name}={meta[name]}, training runs with {given}; "
                "rebuild it with `bagel data plan`"
            )
    if not (0 <= rank < meta["world_size"]) or not (0 <= worker < max(meta["num_workers"], 1)):
        raise ConfigError(
            f"rank {rank} / worker {worker} outside the manifest's {meta['world_size']} x {meta['num_workers']} layout"
        )
    frame = (
        pl.read_parquet(Path(manifest_dir) / MANIFEST_FILE)
        .filter((pl.col("rank") == rank) & (pl.col("worker") == worker))
        .sort(["group", "position"])
    )
    out: dict[str, list[DataUnit]] = {g: [] for g in meta["groups"]}
    for rec in frame.iter_rows(named=True):
        size, mtime = rec.get("file_size", -1), rec.get("file_mtime_ns", -1)  # absent in older manifests
        identity = (size, mtime) if size is not None and size >= 0 else None
        out[rec["group"]].append(
            DataUnit(rec["group"], rec["dataset"], rec["source_file"], rec["row_group"], rec["line"], identity=identity)
        )
    return out


def format_manifest_table(manifest: Manifest) -> str:
    """Per-group table for the CLI."""
    head = f"{'group':<14} {'task':<5} {'units':>7} {'per rank':>9} {'per worker':>11} {'dropped':>8}  notes"
    lines = [
        f"world_size {manifest.world_size}  num_workers {manifest.num_workers}  seed {manifest.seed}",
        head,
        "-" * len(head),
    ]
    for name, g in manifest.groups.items():
        dropped = g["dropped_at_rank_level"] + g["dropped_at_worker_level"]
        lines.append(
            f"{name:<14} {g['task']:<5} {g['units']:>7} {g['per_rank']:>9} {g['per_worker']:>11} "
            f"{dropped:>8}  {'; '.join(g['notes'])}"
        )
    if manifest.quarantine is not None:
        q = summarise(manifest.quarantine)
        reasons = ", ".join(f"{r} {n}" for r, n in q["by_reason"].items()) or "none"
        lines.append(f"quarantined in the index (skipped unread by training): {q['samples']} ({reasons})")
    for problem in manifest.problems:
        lines.append(f"ERROR: {problem}")
    return "\n".join(lines)


# ---- packing simulation ----------------------------------------------------------------------------
def _norm(path: str) -> str:
    return os.path.realpath(path)


def _samples_by_unit(stats: pl.DataFrame) -> dict[tuple[str, int, int], list[SimSample]]:
    """Counted samples keyed by unit: (file, -1, -1) for T2I, (file, rg, -1) edit, (file, -1, line) VLM."""
    out: dict[tuple[str, int, int], list[SimSample]] = defaultdict(list)
    missing = sorted(
        {"variant_prob", "variant_est", "variant_total", "variant_cfg_text", "variant_cfg_vit", "variant_cfg_vae"}
        - set(stats.columns)
    )
    if missing:
        raise DataError(f"token_stats.parquet lacks {missing} (written by an older version); re-run `bagel data stats`")
    ordered = stats.sort(["source_file", "row_group", "row_index"])
    for rec in ordered.select(
        [
            "dataset",
            "task",
            "source_file",
            "row_group",
            "row_index",
            "variant_prob",
            "variant_est",
            "variant_total",
            "variant_cfg_text",
            "variant_cfg_vit",
            "variant_cfg_vae",
        ]
    ).iter_rows():
        dataset, task, source, rg, row, probs, ests, totals, c_text, c_vit, c_vae = rec
        running, cum = 0.0, []
        for p in probs:
            running += p
            cum.append(running)
        cfg = tuple((tuple(t), tuple(v), tuple(a)) for t, v, a in zip(c_text, c_vit, c_vae))
        sample = SimSample(dataset, (source, rg, row), tuple(cum), tuple(ests), tuple(totals), cfg)
        path = _norm(source)
        key = (path, -1, -1) if task == "t2i" else (path, rg, -1) if task == "edit" else (path, -1, row)
        out[key].append(sample)
    return out


def _unit_key(task: str, unit: DataUnit) -> tuple[str, int, int]:
    path = _norm(unit.source_file)
    return (path, -1, -1) if task == "t2i" else (path, unit.row_group, -1) if task == "edit" else (path, -1, unit.line)


@dataclass
class PackingReport:
    """The simulation summarised over all ranks and workers."""

    params: dict[str, int]
    cfg_dropout: dict[str, float]
    workers: list[dict[str, Any]]
    packs: int
    steps_per_epoch: int
    mean_fill: float
    mean_length: float
    min_length: int
    max_length: int
    flex_padding_fraction: float
    negative_padding_packs: int
    overflow_flushes: int
    skipped_over_cap: int
    skipped_over_cap_mandatory: int
    discarded_on_overflow: int
    buffered: int
    group_share: list[dict[str, Any]]
    dataset_share: list[dict[str, Any]]
    truncated_workers: int
    samples_over_cap_sometimes: int = 0
    samples_over_cap_always: int = 0
    mode: str = CARRY
    carried: int = 0
    skipped_unfit: int = 0
    pending: int = 0
    stalled_workers: int = 0
    pack_lengths: list[int] = field(repr=False, default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pack_lengths")
        return out


def simulate_packing(
    manifest: Manifest,
    dataset_config: DatasetConfig,
    stats: pl.DataFrame,
    params: PackingParams,
    seed: int | None = None,
    max_packs_per_worker: int = 100_000,
    dropout: CfgDropout | None = None,
) -> PackingReport:
    """Replay the packer for every (rank, worker) of the manifest over token counts only.

    An *epoch* of a worker ends at the first pack flushed after each of its groups has been read once;
    ``steps_per_epoch`` = max over ranks of (workers x the slowest worker's packs), since the
    DataLoader takes one pack per step from its workers in turn. Samples that were quarantined or
    skipped by the statistics are absent, as upstream skips them. ``dropout``: CFG drop probabilities
    applied to real lengths (default :class:`CfgDropout`'s visual_gen values; pass ``NO_DROPOUT`` for
    full plans).
    """
    dropout = CfgDropout() if dropout is None else dropout
    if manifest.problems:
        raise ManifestCapacityError("cannot simulate packing:\n  " + "\n  ".join(manifest.problems))
    by_unit = _samples_by_unit(stats)
    names = list(dataset_config.groups)
    weights = [dataset_config.groups[g].weight for g in names]
    mandatory = [dataset_config.groups[g].is_mandatory for g in names]
    sims: list[WorkerSimulation] = []
    for rank in range(manifest.world_size):
        for worker in manifest.workers:
            samples = []
            for name in names:
                task = manifest.groups[name]["task"]
                units = manifest.assignments[(name, rank, worker)]
                samples.append([s for u in units for s in by_unit.get(_unit_key(task, u), [])])
            sims.append(
                simulate_worker(
                    params,
                    names,
                    weights,
                    mandatory,
                    samples,
                    manifest.seed if seed is None else seed,
                    rank,
                    worker,
                    max_packs_per_worker,
                    dropout,
                )
            )
    report = _report(sims, manifest, dataset_config, params, dropout)
    if stats.height:
        cap = params.max_num_tokens_per_sample
        report.samples_over_cap_sometimes = int(stats.select(pl.col("variant_est").list.max().gt(cap).sum()).item())
        report.samples_over_cap_always = int(stats.select(pl.col("variant_est").list.min().gt(cap).sum()).item())
    return report


def _fates(sims: list[WorkerSimulation]) -> dict[str, dict[str, int]]:
    """Per group, what became of the samples drawn, summed over workers."""
    out: dict[str, dict[str, int]] = {}
    for s in sims:
        for group, fates in s.fates_by_group.items():
            mine = out.setdefault(group, dict.fromkeys(fates, 0))
            for what, n in fates.items():
                mine[what] += n
    return out


def _group_share(
    sims: list[WorkerSimulation],
    dataset_config: DatasetConfig,
    tokens_by_group: dict[str, int],
    total_tokens: int,
) -> list[dict[str, Any]]:
    """Per group: configured weight share vs share of samples drawn vs share trained (packed), tokens,
    and what was lost (over cap, discarded on overflow flushes, unfit) or still pending."""
    fates = _fates(sims)
    drawn_total = sum(f["drawn"] for f in fates.values()) or 1
    packed_total = sum(f["packed"] for f in fates.values()) or 1
    total_weight = sum(g.weight for g in dataset_config.groups.values())
    rows = []
    for name, g in dataset_config.groups.items():
        f = fates.get(name) or dict.fromkeys(FATES, 0)
        rows.append(
            {
                "group": name,
                "weight_share": g.weight / total_weight,
                "mandatory": g.is_mandatory,
                "drawn_share": f["drawn"] / drawn_total,
                "trained_share": f["packed"] / packed_total,
                "token_share": tokens_by_group.get(name, 0) / total_tokens,
                "tokens": tokens_by_group.get(name, 0),
                "samples": f["packed"],
                **f,
            }
        )
    return rows


def _report(
    sims: list[WorkerSimulation],
    manifest: Manifest,
    dataset_config: DatasetConfig,
    params: PackingParams,
    dropout: CfgDropout,
) -> PackingReport:
    lengths = [n for s in sims for n in s.pack_lengths]
    packs = len(lengths)
    steps = 0
    for rank in range(manifest.world_size):
        mine = [len(s.pack_lengths) for s in sims if s.rank == rank]
        steps = max(steps, len(mine) * max(mine))
    tokens_by_group: dict[str, int] = defaultdict(int)
    tokens_by_dataset: dict[str, int] = defaultdict(int)
    for s in sims:
        for k, v in s.tokens_by_group.items():
            tokens_by_group[k] += v
        for k, v in s.tokens_by_dataset.items():
            tokens_by_dataset[k] += v
    total_tokens = sum(tokens_by_group.values()) or 1
    group_share = _group_share(sims, dataset_config, tokens_by_group, total_tokens)
    group_of = {d: name for name, g in dataset_config.groups.items() for d in g.dataset_names}
    total_weight = sum(g.weight for g in dataset_config.groups.values())
    dataset_share = [
        {
            "dataset": d,
            "group": group_of.get(d, "?"),
            "tokens": t,
            "token_share": t / total_tokens,
            "group_weight_share": dataset_config.groups[group_of[d]].weight / total_weight if d in group_of else None,
        }
        for d, t in sorted(tokens_by_dataset.items())
    ]
    pads = [params.max_num_tokens - n for n in lengths]
    workers = [
        {
            "rank": s.rank,
            "worker": s.worker,
            "packs": len(s.pack_lengths),
            "overflow_flushes": s.overflow_flushes,
            "packed_samples": s.packed_samples,
            "skipped_over_cap": s.skipped_cap,
            "discarded_on_overflow": s.discarded_overflow,
            "carried": s.carried,
            "skipped_unfit": s.unfit,
            "max_buffer": s.max_buffer,
            "first_pass_pack": s.first_pass_pack,
            "truncated": s.truncated,
            "stalled": s.stalled,
        }
        for s in sims
    ]
    return PackingReport(
        params=asdict(params),
        cfg_dropout=asdict(dropout),
        workers=workers,
        packs=packs,
        steps_per_epoch=steps,
        mean_fill=(sum(lengths) / packs / params.expected_num_tokens) if packs else 0.0,
        mean_length=(sum(lengths) / packs) if packs else 0.0,
        min_length=min(lengths) if lengths else 0,
        max_length=max(lengths) if lengths else 0,
        flex_padding_fraction=(sum(pads) / (packs * params.max_num_tokens)) if packs else 0.0,
        negative_padding_packs=sum(1 for p in pads if p < 0),
        overflow_flushes=sum(s.overflow_flushes for s in sims),
        skipped_over_cap=sum(s.skipped_cap for s in sims),
        skipped_over_cap_mandatory=sum(s.skipped_cap_mandatory for s in sims),
        discarded_on_overflow=sum(s.discarded_overflow for s in sims),
        buffered=sum(s.buffered for s in sims),
        group_share=group_share,
        dataset_share=dataset_share,
        truncated_workers=sum(1 for s in sims if s.truncated),
        mode=params.mode,
        carried=sum(s.carried for s in sims),
        skipped_unfit=sum(s.unfit for s in sims),
        pending=sum(f["pending"] for f in _fates(sims).values()),
        stalled_workers=sum(1 for s in sims if s.stalled),
        pack_lengths=lengths,
    )


#: A group whose trained share differs from its drawn share by more than this (relative) is flagged.
SKEW_TOLERANCE = 0.10


def skew_warnings(report: PackingReport) -> list[str]:
    """Groups the packer trains at a share visibly different from the share it draws, with the causes."""
    out = []
    for g in report.group_share:
        if not g["drawn"] or abs(g["trained_share"] / g["drawn_share"] - 1) <= SKEW_TOLERANCE:
            continue
        causes = ", ".join(
            f"{n} {what.replace('_', ' ')}"
            for what in ("discarded_on_flush", "skipped_over_cap", "unfit")
            if (n := g[what])
        )
        fix = "; --packing carry keeps every sample read" if g["discarded_on_flush"] else ""
        out.append(
            f"WARNING: {g['group']} is drawn for {g['drawn_share']:.1%} of the samples but trained on "
            f"{g['trained_share']:.1%} ({causes or 'samples pending at the end'}){fix}"
        )
    return out


def _group_lines(report: PackingReport) -> list[str]:
    """Per group: weight vs drawn vs trained shares, tokens, and what became of the samples drawn."""
    head = (
        f"  {'group':<14} {'weight':>7} {'drawn':>7} {'trained':>7} {'tokens':>7} {'drawn n':>8} {'trained n':>9} "
        f"{'over cap':>8} {'discarded':>9} {'unfit':>6} {'carried':>7} {'pending':>7}"
    )
    lines = ["  shares of samples (weight: configured; drawn: read by the packer; trained: packed) and of tokens", head]
    for g in report.group_share:
        mark = " (mandatory)" if g["mandatory"] else ""
        lines.append(
            f"  {g['group']:<14} {g['weight_share']:>7.3f} {g['drawn_share']:>7.3f} {g['trained_share']:>7.3f} "
            f"{g['token_share']:>7.3f} {g['drawn']:>8} {g['packed']:>9} {g['skipped_over_cap']:>8} "
            f"{g['discarded_on_flush']:>9} {g['unfit']:>6} {g['carried']:>7} {g['pending']:>7}{mark}"
        )
    return lines


def format_packing_table(report: PackingReport) -> str:
    """The simulation as the CLI prints it (same numbers as the Dagster metadata)."""
    p = report.params
    lengths = f"{report.mean_length:>10.1f} / {report.min_length} / {report.max_length}"
    lines = [
        (
            f"packing simulation (--packing {report.mode}; expected {p['expected_num_tokens']}, max "
            f"{p['max_num_tokens']}, per-sample cap {p['max_num_tokens_per_sample']}, prefer_buffer_before "
            f"{p['prefer_buffer_before']}, max_buffer_size {p['max_buffer_size']}; CFG dropout text/vit/vae "
            f"{report.cfg_dropout['text']}/{report.cfg_dropout['vit']}/{report.cfg_dropout['vae']})"
        ),
        f"  packs per epoch (all ranks/workers) {report.packs:>10}",
        f"  steps per epoch                     {report.steps_per_epoch:>10}",
        f"  mean fill vs expected_num_tokens    {report.mean_fill:>10.3f}",
        f"  pack length mean / min / max        {lengths}",
        f"  flex padding waste                  {report.flex_padding_fraction:>10.3%}",
        f"  packs over max_num_tokens           {report.negative_padding_packs:>10}",
        f"  overflow flushes                    {report.overflow_flushes:>10}",
        (
            f"  samples skipped (over cap)          {report.skipped_over_cap:>10}  "
            f"(mandatory fill: {report.skipped_over_cap_mandatory})"
        ),
        (
            f"  distinct samples over the cap       {report.samples_over_cap_sometimes:>10}  "
            f"(in every variant: {report.samples_over_cap_always})"
        ),
        f"  samples discarded on overflow flush {report.discarded_on_overflow:>10}",
        f"  samples carried to the next pack    {report.carried:>10}",
        f"  samples unfit beside mandatory fill {report.skipped_unfit:>10}",
        f"  samples buffered                    {report.buffered:>10}",
        *_group_lines(report),
    ]
    for d in report.dataset_share:
        lines.append(f"    dataset {d['dataset']:<20} token share {d['token_share']:.3f}")
    lines += [f"  {w}" for w in skew_warnings(report)]
    if report.truncated_workers:
        lines.append(f"  WARNING: {report.truncated_workers} worker(s) hit the pack limit before an epoch ended")
    if report.stalled_workers:
        lines.append(
            f"  WARNING: {report.stalled_workers} worker(s) stopped: no sample fitted for a long time (mandatory "
            "samples leave no room below max_num_tokens?)"
        )
    return "\n".join(lines)


def write_simulation(report: PackingReport, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SIMULATION_JSON
    path.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
    return path
