"""``sampling_manifest``: which rank/worker reads which files/rows, the num_used_data rule, and a packing
simulation (packs per epoch, fill, padding, drops, token share vs weight).

The manifest is written even when some worker would get no data, with the problems recorded; the
blocking ``num_used_data_capacity`` check then fails and stops training before launch.
"""

import dagster as dg
import polars as pl

from assets import presentation
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.token_stats import token_stats
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.plan.manifest import (
    PackingReport,
    build_manifest,
    format_manifest_table,
    format_packing_table,
    read_manifest_meta,
    simulate_packing,
    write_manifest,
    write_simulation,
)
from bagel_core.plan.packing import CfgDropout, PackingParams
from bagel_core.stats.token_stats import STATS_FILE

_DROPOUT = CfgDropout()


class SamplingManifestConfig(dg.Config):
    """What only the plan needs; the launch layout (world size, workers, seed, token budgets) comes from
    the ``launch`` resource the training run uses too."""

    simulate: bool = True
    cfg_text_dropout: float = _DROPOUT.text
    cfg_vit_dropout: float = _DROPOUT.vit
    cfg_vae_dropout: float = _DROPOUT.vae


def manifest_mismatches(workspace: PipelineWorkspace, launch: TrainingLaunch) -> list[str]:
    """How the manifest on disk differs from the launch layout (empty: it matches)."""
    meta = read_manifest_meta(workspace.manifest_dir)
    wanted = {"world_size": launch.world_size, "num_workers": launch.num_workers, "seed": launch.data_seed}
    return [
        f"manifest has {key}={meta.get(key)}, the launch configuration {key}={value}: re-materialise "
        "sampling_manifest with the launch resource the training run uses"
        for key, value in wanted.items()
        if meta.get(key) != value
    ]


@dg.asset(
    group_name="data",
    deps=[token_stats],
    kinds={"parquet"},
    description="Per-rank, per-worker assignment of data units (upstream's sharding rule) and a packing "
    "simulation over the token statistics.",
)
def sampling_manifest(
    context: dg.AssetExecutionContext,
    config: SamplingManifestConfig,
    workspace: PipelineWorkspace,
    launch: TrainingLaunch,
) -> dg.MaterializeResult:
    registry = Registry.load(workspace.registry_path)
    dataset_config = load_dataset_config(workspace.dataset_config_path)
    # the index's quarantine list travels with the manifest, so the loader never reads a known-bad row
    index = workspace.index_dir if workspace.index_dir.is_dir() else None
    manifest = build_manifest(
        dataset_config,
        registry,
        launch.world_size,
        launch.num_workers,
        launch.data_seed,
        strict=False,
        packing=launch.packing,
        index=index,
    )
    parquet_path, _ = write_manifest(manifest, workspace.manifest_dir)
    context.log.info("\n" + format_manifest_table(manifest))
    metadata: dict[str, object] = {
        "path": dg.MetadataValue.path(str(parquet_path)),
        "world_size": launch.world_size,
        "num_workers": launch.num_workers,
        "seed": launch.data_seed,
        "ok": not manifest.problems,
        "problems": dg.MetadataValue.json(manifest.problems),
        "groups": dg.MetadataValue.json(manifest.groups),
        "table": presentation.text_block(format_manifest_table(manifest)),
    }
    if config.simulate and not manifest.problems:
        params = PackingParams(
            launch.expected_num_tokens,
            launch.max_num_tokens,
            launch.max_num_tokens_per_sample,
            launch.prefer_buffer_before,
            launch.max_buffer_size,
            mode=launch.packing,
        )
        dropout = CfgDropout(config.cfg_text_dropout, config.cfg_vit_dropout, config.cfg_vae_dropout)
        report = simulate_packing(
            manifest, dataset_config, pl.read_parquet(workspace.stats_dir / STATS_FILE), params, dropout=dropout
        )
        write_simulation(report, workspace.manifest_dir)
        table = format_packing_table(report)
        context.log.info("\n" + table)
        metadata.update(
            {
                "packs_per_epoch": report.packs,
                "steps_per_epoch": report.steps_per_epoch,
                "mean_fill": report.mean_fill,
                "flex_padding_fraction": report.flex_padding_fraction,
                "skipped_over_cap": report.skipped_over_cap,
                "discarded_on_overflow": report.discarded_on_overflow,
                "packing": report.mode,
                "carried_to_next_pack": report.carried,
                "skipped_unfit": report.skipped_unfit,
                "token_share": presentation.table(report.group_share),
                "simulation": presentation.text_block(table),
                "simulation_plot": presentation.figure(_draw_simulation(report), "packing", size=(8, 3)),
            }
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=sampling_manifest,
    blocking=True,
    description="Every group needs units >= world_size x num_workers, or a worker gets no data and "
    "upstream training hangs (data-format.md 12.3).",
)
def num_used_data_capacity(workspace: PipelineWorkspace) -> dg.AssetCheckResult:
    meta = read_manifest_meta(workspace.manifest_dir)
    return dg.AssetCheckResult(
        passed=bool(meta.get("ok")),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(meta.get("problems", [])),
            "world_size": meta.get("world_size"),
            "num_workers": meta.get("num_workers"),
            "units_per_group": dg.MetadataValue.json({g: v["units"] for g, v in meta.get("groups", {}).items()}),
        },
    )


def _draw_simulation(report: PackingReport):
    """Pack-length histogram beside token share vs weight share per group."""

    def draw(fig) -> None:
        a, b = fig.subplots(1, 2)
        a.hist(report.pack_lengths, bins=30)
        a.axvline(report.params["expected_num_tokens"], color="green", linestyle="--", label="expected")
        a.axvline(report.params["max_num_tokens"], color="red", linestyle="--", label="max")
        a.set_xlabel("pack length (tokens)")
        a.legend(fontsize=7)
        names = [g["group"] for g in report.group_share]
        xs = range(len(names))
        b.bar([x - 0.2 for x in xs], [g["weight_share"] for g in report.group_share], width=0.4, label="weight")
        b.bar([x + 0.2 for x in xs], [g["token_share"] for g in report.group_share], width=0.4, label="tokens")
        b.set_xticks(list(xs), names, fontsize=7)
        b.legend(fontsize=7)

    return draw


@dg.asset_check(
    asset=sampling_manifest,
    blocking=True,
    description="The manifest was planned for the launch configuration the training run uses (world size, "
    "DataLoader workers, data seed); otherwise ranks would read another plan's units.",
)
def manifest_matches_launch(workspace: PipelineWorkspace, launch: TrainingLaunch) -> dg.AssetCheckResult:
    problems = manifest_mismatches(workspace, launch)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"problems": dg.MetadataValue.json(problems), "world_size": launch.world_size},
    )
