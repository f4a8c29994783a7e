"""Assets that fetch the example archive, extract it safely and register its datasets."""

import dagster as dg

from assets import presentation
from assets.dataset_index import sync_dataset_partitions
from assets.resources import PipelineWorkspace
from bagel_core.config.dataset_config import DatasetConfig, load_dataset_config
from bagel_core.config.discover import default_dataset_config, discover_registry, localize_parquet_info
from bagel_core.config.registry import Registry, import_upstream_dataset_info
from bagel_core.config.validate import validate_registry
from bagel_core.data.example_generator import ExampleConfig
from bagel_core.data.fetch import (
    ARCHIVE_NAME,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_TOTAL_BYTES,
    OFFICIAL_EXAMPLE_URL,
    fetch_archive,
    safe_extract,
    summarize_tree,
)


class ExampleSourceConfig(dg.Config):
    """Where the example comes from. ``builtin`` works offline; the official URL needs internet."""

    source: str = "builtin"
    sha256: str | None = None
    t2i_files: int = 10
    t2i_rows_per_file: int = 10
    edit_files: int = 10
    vlm_lines: int = 100
    seed: int = 0


class ExtractConfig(dg.Config):
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_files: int = DEFAULT_MAX_FILES


@dg.asset(
    group_name="data",
    kinds={"file"},
    description=f"The example archive `{ARCHIVE_NAME}`: generated (`builtin`) or downloaded "
    f"(e.g. {OFFICIAL_EXAMPLE_URL}), checksum-verified.",
)
def example_zip(
    context: dg.AssetExecutionContext, config: ExampleSourceConfig, workspace: PipelineWorkspace
) -> dg.MaterializeResult:
    builtin = ExampleConfig(
        t2i_files=config.t2i_files,
        t2i_rows_per_file=config.t2i_rows_per_file,
        edit_files=config.edit_files,
        vlm_lines=config.vlm_lines,
        seed=config.seed,
    )
    result = fetch_archive(config.source, workspace.example_dir, config.sha256, builtin_config=builtin, progress=False)
    context.log.info(f"{config.source} -> {result.path} ({result.bytes} bytes)")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(result.path)),
            "source": config.source,
            "bytes": result.bytes,
            "sha256": result.sha256,
            "resumed_from_bytes": result.resumed_from,
        },
        data_version=dg.DataVersion(result.sha256),
    )


@dg.asset(
    group_name="data",
    deps=[example_zip],
    kinds={"file"},
    description="The extracted `bagel_example/` folder (zip-slip, link and size-bomb safe; idempotent).",
)
def example_dataset(
    context: dg.AssetExecutionContext, config: ExtractConfig, workspace: PipelineWorkspace
) -> dg.MaterializeResult:
    archive = workspace.example_dir / ARCHIVE_NAME
    extracted = safe_extract(
        archive, workspace.example_dir, max_total_bytes=config.max_total_bytes, max_files=config.max_files
    )
    root = workspace.example_dir / "bagel_example"
    per_task = summarize_tree(root)
    rows = [{"folder": task, "files": info["files"], "bytes": info["bytes"]} for task, info in per_task.items()]
    context.log.info(f"extracted {extracted.files} files to {root} (skipped={extracted.skipped})")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(root)),
            "files": extracted.files,
            "bytes": extracted.bytes,
            "unchanged_archive_skipped": extracted.skipped,
            "per_task": presentation.table(rows),
            **{f"{task}/files": info["files"] for task, info in per_task.items()},
            **{f"{task}/bytes": info["bytes"] for task, info in per_task.items()},
        }
    )


class DatasetRegistryConfig(dg.Config):
    """Where the registered data comes from (everything downstream runs on it):

    * ``example``: the extracted built-in example (the default);
    * ``registry``: ``path`` is our registry YAML (``bagel data registry`` writes one);
    * ``upstream``: ``path`` is upstream's ``data/dataset_info.py`` (read, never executed) and
      ``data_root`` replaces its ``your_data_path`` placeholders.

    ``dataset_config`` is a dataset-group YAML (upstream ``example.yaml`` schema); empty: every
    registered dataset with upstream's example settings. Paths that differ per environment can come
    from environment variables in the run config (``path: {env: BAGEL_REGISTRY}``).
    """

    source: str = "example"
    path: str = ""
    data_root: str = ""
    dataset_config: str = ""

    def load(self, workspace: PipelineWorkspace) -> tuple[Registry, DatasetConfig]:
        info_dir = workspace.registry_path.parent / "parquet_info"
        if self.source == "example":
            registry = discover_registry(workspace.example_dir, parquet_info_dir=info_dir)
        elif self.source == "registry" and self.path:
            registry = Registry.load(self.path)
        elif self.source == "upstream" and self.path:
            registry = import_upstream_dataset_info(self.path, data_root=self.data_root or None)
            registry = localize_parquet_info(registry, info_dir)
        else:
            raise dg.Failure(
                f"dataset_registry: source {self.source!r} with path {self.path!r}: use source example, or "
                "registry / upstream with path set to the registry YAML / upstream dataset_info.py"
            )
        groups = load_dataset_config(self.dataset_config) if self.dataset_config else default_dataset_config(registry)
        groups.check_against(registry)
        return registry, groups


@dg.asset(
    group_name="data",
    deps=[example_dataset],
    kinds={"yaml"},
    check_specs=[
        dg.AssetCheckSpec(
            "registry_valid",
            asset="dataset_registry",
            blocking=True,
            description="No placeholder, missing path or parquet_info mismatch",
        )
    ],
    description="Dataset registry (upstream DATASET_INFO fields) and dataset-group YAML (upstream "
    "example.yaml schema) for the extracted example, your registry YAML or an upstream dataset_info.py.",
)
def dataset_registry(context: dg.AssetExecutionContext, config: DatasetRegistryConfig, workspace: PipelineWorkspace):
    registry, groups = config.load(workspace)
    registry.source = workspace.registry_path
    registry.save(workspace.registry_path)
    groups.save(workspace.dataset_config_path)
    partition_keys = sync_dataset_partitions(context.instance, registry)
    findings = validate_registry(registry)
    for finding in findings:
        (context.log.error if finding.severity == "error" else context.log.warning)(str(finding))
    table = [
        {"group": e.group, "dataset": e.name, "files": e.num_files, "samples": e.num_total_samples,
         "data_dir": str(e.data_dir)}
        for e in registry.entries
    ]  # fmt: skip
    yield dg.MaterializeResult(
        metadata={
            "registry": dg.MetadataValue.path(str(workspace.registry_path)),
            "dataset_config": dg.MetadataValue.path(str(workspace.dataset_config_path)),
            "datasets": len(registry.entries),
            "index_partitions": dg.MetadataValue.json(partition_keys),
            "dagster/row_count": len(registry.entries),
            "entries": presentation.table(table),
        }
    )
    errors = [str(f) for f in findings if f.severity == "error"]
    yield dg.AssetCheckResult(
        check_name="registry_valid",
        passed=not errors,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "errors": dg.MetadataValue.json(errors),
            "warnings": dg.MetadataValue.json([str(f) for f in findings if f.severity == "warning"]),
        },
    )
