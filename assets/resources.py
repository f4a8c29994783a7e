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
    def latents_dir(self) -> Path:
        """The VAE latent cache (``latents.json`` + ``shards/``) the training run reads."""
        return self.path("latents")

    @property
    def runs_dir(self) -> Path:
        return self.path("runs")

    def trainer_data_args(self) -> list[str]:
        """The trainer arguments (upstream names) that point it at this workspace's registered data and manifest."""
        return [
            "--dataset_info", str(self.registry_path), "--dataset_config_file", str(self.dataset_config_path),
            "--manifest", str(self.manifest_dir),
        ]  # fmt: skip


class TrainingLaunch(dg.ConfigurableResource):
    """The one launch layout the sampling manifest is planned for and the training run uses, so the
    manifest always matches the run that consumes it. Defaults: the built-in example on 2 CPU processes."""

    # "local": torchrun on this machine (the launcher resource); "k8s": one pod (the k8s_launcher resource)
    backend: str = "local"
    nnodes: int = 1
    nproc_per_node: int = 2
    num_workers: int = 1
    data_seed: int = 42
    expected_num_tokens: int = 4096
    max_num_tokens: int = 6144
    max_num_tokens_per_sample: int = 6000
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50
    packing: str = "carry"  # "carry": no sample read is discarded; "upstream": upstream's rule, exactly
    # memory plan budgets (`bagel plan-memory`): GiB per GPU and of host RAM per node; 0: the machine that runs
    # the asset (its GPU, else its CPU and RAM). A k8s launch needs device_memory_gb to be checked.
    device_memory_gb: float = 0.0
    host_memory_gb: float = 0.0

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def train_args(self) -> list[str]:
        """The trainer arguments this layout fixes (upstream names)."""
        return [
            "--num_workers", str(self.num_workers), "--data_seed", str(self.data_seed),
            "--expected_num_tokens", str(self.expected_num_tokens), "--max_num_tokens", str(self.max_num_tokens),
            "--max_num_tokens_per_sample", str(self.max_num_tokens_per_sample),
            "--prefer_buffer_before", str(self.prefer_buffer_before), "--max_buffer_size", str(self.max_buffer_size),
            "--packing", self.packing,
        ] + self.memory_args()  # fmt: skip

    def memory_args(self) -> list[str]:
        """The memory plan's budgets, when configured (the trainer and the ``memory_plan_fits`` check use them)."""
        budgets = (("--device_memory_gb", self.device_memory_gb), ("--host_memory_gb", self.host_memory_gb))
        return [arg for flag, gb in budgets if gb > 0 for arg in (flag, str(gb))]
