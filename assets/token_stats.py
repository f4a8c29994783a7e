"""``token_stats``: exact text/ViT/VAE tokens per sample, with histograms and cap/latent-size checks.

Thin wrapper over :func:`bagel_core.stats.token_stats.compute_token_stats`; the artefacts stay on
disk under ``workspace.stats_dir`` and the metadata carries the summary, a histogram and the worst
violations.
"""

import json

import dagster as dg
import polars as pl

from assets import presentation
from assets.resources import PipelineWorkspace
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.sequence.tokens import DEFAULT_MAX_LATENT_SIZE
from bagel_core.stats.token_stats import (
    DEFAULT_MAX_TOKENS_PER_SAMPLE,
    SUMMARY_JSON,
    compute_token_stats,
    over_cap_rows,
)


class TokenStatsConfig(dg.Config):
    """Caps the statistics check against (use the training run's values)."""

    max_num_tokens_per_sample: int = DEFAULT_MAX_TOKENS_PER_SAMPLE
    max_latent_size: int = DEFAULT_MAX_LATENT_SIZE
    batch_size: int = 2048
    tokenizer_path: str | None = None


@dg.asset(
    group_name="data",
    deps=[dg.AssetKey("dataset_index")],
    kinds={"polars", "parquet"},
    description="Exact tokens per ok sample (text / ViT / VAE incl. wrapping tokens, packer estimate); "
    "summary per dataset and task; samples over the per-sample cap or max_latent_size.",
)
def token_stats(
    context: dg.AssetExecutionContext, config: TokenStatsConfig, workspace: PipelineWorkspace
) -> dg.MaterializeResult:
    registry = Registry.load(workspace.registry_path)
    dataset_config = load_dataset_config(workspace.dataset_config_path)
    backend = load_tokenizer(config.tokenizer_path)[0].backend_tokenizer
    result = compute_token_stats(
        registry,
        dataset_config,
        workspace.index_dir,
        workspace.stats_dir,
        backend,
        max_num_tokens_per_sample=config.max_num_tokens_per_sample,
        max_latent_size=config.max_latent_size,
        batch_size=config.batch_size,
        progress=lambda done, total: context.log.debug(f"token stats {done}/{total}"),
    )
    stats = pl.read_parquet(result.stats_path)
    summary_cols = [
        "dataset",
        "task",
        "count",
        "text_tokens_sum",
        "vit_tokens_sum",
        "vae_tokens_sum",
        "total_tokens_sum",
        "total_tokens_mean",
        "total_tokens_p50",
        "total_tokens_p90",
        "total_tokens_p99",
        "total_tokens_max",
        "over_cap",
        "latent_overflow",
        "quarantined",
        "skipped",
    ]
    summary = result.summary.select([c for c in summary_cols if c in result.summary.columns])
    metadata: dict[str, object] = {
        "dagster/row_count": result.num_counted,
        "path": dg.MetadataValue.path(str(result.stats_path)),
        "counted": result.num_counted,
        "skipped": result.num_skipped,
        "skipped_reasons": dg.MetadataValue.json(result.skipped_reasons),
        "quarantined_in_index": result.num_quarantined,
        "not_in_dataset_config": result.num_not_configured,
        "over_cap": result.num_over_cap,
        "latent_overflow": result.num_latent_overflow,
        "vit_overflow": result.num_vit_overflow,
        "total_tokens": int(stats["total_tokens"].sum()) if stats.height else 0,
        "samples_per_s": result.num_counted / max(result.seconds, 1e-9),
        "summary": presentation.table(summary),
    }
    if stats.height:
        metadata["histogram_total_tokens"] = presentation.figure(
            _draw_histogram(stats, "total_tokens", config.max_num_tokens_per_sample), "total tokens"
        )
        violations = over_cap_rows(stats, 20)
        if violations.height:
            metadata["violations_first_20"] = presentation.table(violations)
    return dg.MaterializeResult(metadata=metadata)


def _draw_histogram(stats: pl.DataFrame, column: str, cap: int | None):
    """Histogram of one count column per task, with the cap marked."""

    def draw(fig) -> None:
        ax = fig.add_subplot()
        for (task,), part in stats.group_by(["task"], maintain_order=True):
            ax.hist(part[column].to_numpy(), bins=40, alpha=0.6, label=str(task))
        if cap is not None:
            ax.axvline(cap, color="red", linestyle="--", label=f"cap {cap}")
        ax.set_xlabel(column)
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)

    return draw


def _summary_json(workspace: PipelineWorkspace) -> dict:
    path = workspace.stats_dir / SUMMARY_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


@dg.asset_check(
    asset=token_stats,
    description="Samples whose packer estimate exceeds max_num_tokens_per_sample "
    "are skipped by the packer (never trained on).",
)
def token_cap_violations(workspace: PipelineWorkspace) -> dg.AssetCheckResult:
    summary = _summary_json(workspace)
    over = int(summary.get("over_cap", 0))
    return dg.AssetCheckResult(
        passed=bool(summary) and over == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "over_cap": over,
            "max_num_tokens_per_sample": summary.get("max_num_tokens_per_sample"),
            "first_violations": dg.MetadataValue.json(
                [v for v in summary.get("violations_first_100", []) if v.get("over_cap")][:20]
            ),
        },
    )


@dg.asset_check(
    asset=token_stats,
    blocking=True,
    description="VAE latent grids larger than max_latent_size (or ViT grids over 70 patches) give "
    "out-of-range position ids and crash training.",
)
def position_table_fits(workspace: PipelineWorkspace) -> dg.AssetCheckResult:
    summary = _summary_json(workspace)
    latent, vit = int(summary.get("latent_overflow", 0)), int(summary.get("vit_overflow", 0))
    return dg.AssetCheckResult(
        passed=bool(summary) and latent == 0 and vit == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "latent_overflow": latent,
            "vit_overflow": vit,
            "max_latent_size": summary.get("max_latent_size"),
            "fix": "lower image_transform_args.max_image_size to <= 16 x max_latent_size, or raise "
            "max_latent_size (released BAGEL needs 64)",
        },
    )
