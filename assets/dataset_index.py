"""``dataset_index``: validate and index every sample of every registered dataset (DuckDB).

Partitioning: one **dynamic** partition per dataset (key ``<group>.<name>``, e.g. ``vlm_sft.llava_ov``),
because datasets are user-defined and only known once the registry exists. The asset handles the
three ways Dagster can run it:

* **no partition key** (the main ``bagel_example_job`` / ``dagster job execute``: Dagster 1.13 runs
  a partitioned asset unpartitioned in a job that has no partition key): it registers a partition
  key per registry dataset, indexes *all* of them in this one step (process pool across files),
  records one materialisation **per dataset partition** plus an overall one;
* **one partition key** (UI "Materialize" of a dataset): only that dataset is re-read; the combined
  ``index.parquet`` is rebuilt from all per-dataset results;
* **a key range** (a UI backfill; ``BackfillPolicy.single_run``): those datasets in one run.

Re-materialising re-reads only files whose identity (size, mtime, footer hash) changed. Checks run
inside the step (they need the fresh results) and block downstream assets on failure.
"""

import warnings
from typing import Any

import dagster as dg

from assets import presentation
from assets.resources import PipelineWorkspace
from bagel_core.config.registry import Registry
from bagel_core.index.indexer import INDEX_SCHEMA, DatasetSummary, IndexOptions, dataset_key, index_registry
from bagel_core.index.probe import DEFAULT_MAX_PIXELS
from bagel_core.index.report import (
    duplicate_keys,
    image_size_distribution,
    image_size_sample,
)

#: One partition per registry dataset; keys are added from the registry at run time.
DATASET_PARTITIONS = dg.DynamicPartitionsDefinition(name="bagel_datasets")

CHECK_ACCOUNTING = "accounting_invariant"
CHECK_QUARANTINE_RATIO = "quarantine_ratio"
CHECK_UNIQUE_KEYS = "unique_sample_keys"


class DatasetIndexConfig(dg.Config):
    """Run-time knobs of the indexer."""

    max_quarantine_ratio: float = 0.05  # blocking check: quarantined / rows per dataset
    workers: int | None = None  # None: every CPU the step may use
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap on declared width * height
    full_decode: bool = False  # decode every image instead of header probes
    force: bool = False  # ignore the incremental cache


def sync_dataset_partitions(instance: dg.DagsterInstance, registry: Registry) -> list[str]:
    """Add a partition key for every registry dataset (idempotent); returns the keys in registry order.

    ``dataset_registry`` may call this too so per-dataset runs can be launched before the first index.
    """
    keys = [dataset_key(e) for e in registry.entries]
    existing = set(instance.get_dynamic_partitions(DATASET_PARTITIONS.name))
    missing = [k for k in keys if k not in existing]
    if missing:
        instance.add_dynamic_partitions(DATASET_PARTITIONS.name, missing)
    return keys


def _reason_rows(summaries: list[DatasetSummary]) -> list[dict[str, Any]]:
    return [
        {"dataset": f"{s.group}.{s.dataset}", "reason": reason, "samples": n}
        for s in summaries
        for reason, n in s.reasons.items()
    ]


def _draw_sizes(sizes: list[tuple[int, int]]):
    def draw(fig) -> None:
        ax = fig.add_subplot()
        ws, hs = zip(*sizes)
        ax.hexbin(ws, hs, gridsize=25, mincnt=1, cmap="viridis")
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
        ax.set_title(f"image sizes ({len(sizes):,} sampled)")

    return draw


def _size_metadata(index_paths: list[str]) -> dict[str, Any]:
    dist = image_size_distribution(index_paths)
    sizes = image_size_sample(index_paths)
    metadata: dict[str, Any] = {
        "image_size_buckets": dg.MetadataValue.json(dist["buckets"]),
        "image_sizes_by_long_edge": presentation.table(
            [{"long_edge": label, "images": n} for label, n in dist["buckets"].items()]
        ),  # type: ignore[union-attr]
        "images": int(dist["images"]),  # type: ignore[arg-type]
    }
    if dist["top_sizes"]:
        metadata["image_sizes_most_common"] = presentation.table(dist["top_sizes"])  # type: ignore[arg-type]
    if sizes:
        metadata["image_size_distribution"] = presentation.figure(
            _draw_sizes(sizes), "image sizes", size=(4, 3), dpi=72
        )
    return metadata


def _summary_metadata(summaries: list[DatasetSummary], seconds: float) -> dict[str, Any]:
    rows = sum(s.rows for s in summaries)
    quarantined = sum(s.quarantined for s in summaries)
    reasons: dict[str, int] = {}
    for s in summaries:
        for reason, n in s.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {
        "dagster/row_count": rows,
        "rows": rows,
        "ok": rows - quarantined,
        "quarantined": quarantined,
        "quarantined_by_reason": dg.MetadataValue.json(reasons),
        "quarantine_table": presentation.table(_reason_rows(summaries)),
        "files": sum(s.files for s in summaries),
        "files_reindexed": sum(s.files_reindexed for s in summaries),
        "files_reused": sum(s.files_reused for s in summaries),
        "files_unreadable": sum(s.files_unreadable for s in summaries),
        "file_bytes": sum(s.file_bytes for s in summaries),
        "image_bytes": sum(s.image_bytes for s in summaries),
        "rows_accepted_by_scan": sum(s.scan_accepted for s in summaries),
        "duration_s": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else 0.0,
    }


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # backfill_policy is beta in 1.13

    @dg.asset(
        group_name="data",
        deps=["dataset_registry"],
        partitions_def=DATASET_PARTITIONS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"duckdb", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_ACCOUNTING,
                asset="dataset_index",
                blocking=True,
                description="Per file: ok + quarantined = rows read (= footer rows)",
            ),
            dg.AssetCheckSpec(
                CHECK_QUARANTINE_RATIO,
                asset="dataset_index",
                blocking=True,
                description="Quarantined share per dataset (unreadable files counted at their estimated size) "
                "<= max_quarantine_ratio",
            ),
            dg.AssetCheckSpec(
                CHECK_UNIQUE_KEYS,
                asset="dataset_index",
                blocking=True,
                description="No duplicate (dataset, file, row) sample keys in the index",
            ),
        ],
        description="Every sample of every registered dataset validated and indexed with DuckDB: "
        "index.parquet (one row per sample), quarantine.parquet (bad samples/files with reasons), "
        "generated parquet_info JSON and a registry pointing at it. One partition per dataset.",
    )
    def dataset_index(context: dg.AssetExecutionContext, config: DatasetIndexConfig, workspace: PipelineWorkspace):
        registry = Registry.load(workspace.registry_path)
        if context.has_partition_key or context.has_partition_key_range:
            selected = list(context.partition_keys)
            per_partition_events = False
        else:
            selected = sync_dataset_partitions(context.instance, registry)
            per_partition_events = True
        known = {dataset_key(e) for e in registry.entries}
        unknown = [k for k in selected if k not in known]
        if unknown:
            raise dg.Failure(
                f"partition(s) {unknown} are not datasets of {workspace.registry_path} "
                f"(registered: {sorted(known)}); re-materialise dataset_registry or drop the partition"
            )
        opts = IndexOptions(
            max_pixels=config.max_pixels, full_decode=config.full_decode, workers=config.workers, force=config.force
        )
        context.log.info(f"indexing {len(selected)} dataset(s) with {opts.resolved_workers()} worker(s): {selected}")
        result = index_registry(registry, workspace.index_dir, opts, datasets=selected)
        for s in result.datasets:
            context.log.info(
                f"{s.group}.{s.dataset}: {s.rows} rows, {s.ok} ok, {s.quarantined} quarantined {s.reasons}; "
                f"{s.files_reindexed}/{s.files} files re-read in {s.seconds:.2f} s"
            )

        if per_partition_events:
            for s in result.datasets:
                meta = _summary_metadata([s], s.seconds)
                meta.update(_size_metadata([s.index_path]))
                meta["index"] = dg.MetadataValue.path(s.index_path)
                meta["quarantine"] = dg.MetadataValue.path(s.quarantine_path)
                yield dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=f"{s.group}.{s.dataset}", metadata=meta
                )

        index_paths = [s.index_path for s in result.datasets]
        metadata = _summary_metadata(result.datasets, result.seconds)
        metadata.update(_size_metadata(index_paths))
        metadata.update(
            {
                "datasets": dg.MetadataValue.json(
                    [s.to_dict() | {"invariant_failures": s.invariant_failures[:5]} for s in result.datasets]
                ),
                "index": dg.MetadataValue.path(str(result.index_path)),
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(f.name, str(f.type)) for f in INDEX_SCHEMA]
                ),
                "quarantine": dg.MetadataValue.path(str(result.quarantine_path)),
                "files_table": dg.MetadataValue.path(str(result.files_path)),
                "parquet_info": dg.MetadataValue.json({k: str(v) for k, v in result.parquet_info.items()}),
                "registry": dg.MetadataValue.path(str(result.registry_path)),
                "registered_parquet_info_problems": dg.MetadataValue.json(
                    {k: v[:20] for k, v in result.parquet_info_problems.items()}
                ),
            }
        )
        for key, problems in result.parquet_info_problems.items():
            context.log.warning(
                f"{key}: registered parquet_info disagrees with the shards: {problems[:5]}; "
                f"{result.registry_path} now points at the generated one"
            )

        # ---- checks on what this run indexed ---------------------------------------------------
        failures = [f for s in result.datasets for f in s.invariant_failures]
        yield dg.AssetCheckResult(
            check_name=CHECK_ACCOUNTING,
            passed=not failures,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "failures": len(failures),
                "examples": dg.MetadataValue.json(failures[:10]),
                "files": sum(s.files for s in result.datasets),
            },
        )
        ratios = {f"{s.group}.{s.dataset}": s.quarantine_ratio for s in result.datasets}
        over = {k: round(v, 4) for k, v in ratios.items() if v > config.max_quarantine_ratio}
        yield dg.AssetCheckResult(
            check_name=CHECK_QUARANTINE_RATIO,
            passed=not over,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "threshold": config.max_quarantine_ratio,
                "ratios": dg.MetadataValue.json({k: round(v, 4) for k, v in ratios.items()}),
                "over_threshold": dg.MetadataValue.json(over),
                "quarantine": dg.MetadataValue.path(str(result.quarantine_path)),
            },
            description=(
                f"over {config.max_quarantine_ratio:.2%}: {over}; inspect quarantine.parquet or raise "
                "max_quarantine_ratio in the run config"
            )
            if over
            else None,
        )
        n_dup, examples = duplicate_keys([str(result.index_path)])
        yield dg.AssetCheckResult(
            check_name=CHECK_UNIQUE_KEYS,
            passed=n_dup == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "duplicate_keys": n_dup,
                "examples": dg.MetadataValue.json([list(map(str, e)) for e in examples]),
            },
        )
        yield dg.MaterializeResult(metadata=metadata)
