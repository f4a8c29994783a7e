"""Jobs, resources, schedules and sensors around the assets of the ``assets`` package.

Every asset module under ``assets/`` is picked up automatically, so a new asset only needs its own
module; the main job materialises the whole graph.
"""

from __future__ import annotations

import os

import dagster as dg

import assets as asset_package
from assets.k8s_launcher import K8sTorchrunLauncher
from assets.launcher import LocalTorchrunLauncher
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.training import checkpoint, checkpoint_smoke
from pipelines.automation import CHECKPOINT_SMOKE_JOB, dataset_change_sensor, new_checkpoint_sensor, retrain_schedule

# AssetSpecs (assets materialised by another asset's step, such as the checkpoint partitions) are
# not picked up by the package loader: list them here.
all_assets = [*dg.load_assets_from_package_module(asset_package), checkpoint]
all_checks = dg.load_asset_checks_from_package_module(asset_package)

# one run per checkpoint partition, requested by new_checkpoint_sensor; never part of the unpartitioned jobs
_PER_CHECKPOINT = dg.AssetSelection.assets(checkpoint_smoke)
checkpoint_smoke_job = dg.define_asset_job(
    name=CHECKPOINT_SMOKE_JOB,
    selection=_PER_CHECKPOINT,
    description="Smoke inference on one checkpoint partition (new_checkpoint_sensor starts it for each new one).",
)

bagel_example_job = dg.define_asset_job(
    name="bagel_example_job",
    selection=dg.AssetSelection.all() - _PER_CHECKPOINT,
    # every step in the run's own process: starting a Python process per step cost about 10 s each
    # (dagster + torch imports) for steps of a few seconds; the training runs in torchrun's processes anyway
    executor_def=dg.in_process_executor,
    description="The whole pipeline on the built-in example: fetch, extract, register, validate, index, "
    "statistics, manifest, then train (torchrun), record checkpoints, export and a smoke inference.",
)

_DATA = dg.AssetSelection.assets("dataset_registry", "dataset_index", "token_stats", "sampling_manifest")
data_job = dg.define_asset_job(
    name="data_job",
    selection=_DATA,
    description="Register (dataset_registry's source: example, your registry YAML or upstream dataset_info.py), "
    "validate and index, token statistics, sampling manifest.",
)
train_job = dg.define_asset_job(
    name="train_job",
    selection=(
        dg.AssetSelection.assets("dataset_registry").downstream()
        - dg.AssetSelection.assets("dataset_registry")
        - _PER_CHECKPOINT
    ).materializable(),
    description="Index, statistics, manifest, training, export and smoke inference on the registered data "
    "(run data_job or dataset_registry first to register your data).",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[bagel_example_job, data_job, train_job, checkpoint_smoke_job],
    sensors=[dataset_change_sensor, new_checkpoint_sensor],
    schedules=[retrain_schedule],
    resources={
        "workspace": PipelineWorkspace(root=os.environ.get("BAGEL_WORKSPACE", "data/pipeline")),
        "launch": TrainingLaunch(),
        "launcher": LocalTorchrunLauncher(),
        # used when launch.backend is "k8s"; configure image, GPUs and the workspace volume in run config
        "k8s_launcher": K8sTorchrunLauncher(),
    },
)
