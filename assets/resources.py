"""Resources shared by all assets: where the pipeline keeps its files.

Assets exchange *paths*, never pickled objects: each asset writes its artefact under the workspace
and downstream assets read it from the same deterministic location.
"""

from pathlib import Path

import dagster as dg


class PipelineWorkspace(dg.ConfigurableResource):
    """Root folder of everything the pipeline writes (relative paths are taken from the cwd)."""

    root: str = "data/pipeline"

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def path(self, *parts: str) -> Path:
        return self.root_path.joinpath(*parts)

    @property
    def example_dir(self) -> Path:
        """``bagel_example.zip`` and the extracted ``bagel_example/`` live here."""
        return self.path("example")

    @property
    def registry_path(self) -> Path:
        return self.path("registry", "dataset_info.yaml")

    @property
    def dataset_config_path(self) -> Path:
        return self.path("registry", "example.yaml")

    @property
    def index_dir(self) -> Path:
        """``index.parquet``, ``quarantine.parquet`` and ``parquet_info/``."""
        return self.path("index")

    @property
    def stats_dir(self) -> Path:
        return self.path("stats")

    @property
    def manifest_dir(self) -> Path:
        return self.path("manifest")

    @property
    def runs_dir(self) -> Path:
        return self.path("runs")
