"""Jobs, resources, schedules and sensors around the assets of the ``assets`` package.

Every asset module under ``assets/`` is picked up automatically, so a new asset only needs its own
module; the main job materialises the whole graph.
"""

from __future__ import annotations

import os

import dagster as dg

import assets as asset_package
from assets.launcher import LocalTorchrunLauncher
from assets.resources import PipelineWorkspace, TrainingLaunch
from assets.training import checkpoint
from pipelines.automation import registered_data_changed, weekly_refresh

# AssetSpecs (assets materialised by another asset's step, such as the checkpoint partitions) are
# not picked up by the package loader: list them here.
all_assets = [*dg.load_assets_from_package_module(asset_package), checkpoint]
all_checks = dg.load_asset_checks_from_package_module(asset_package)

bagel_example_job = dg.define_asset_job(
    name="bagel_example_job",
    selection=dg.AssetSelection.all(),
    description="The whole pipeline on the built-in example: fetch, extract, register, validate, index, "
    "statistics, manifest, then train (torchrun), record checkpoints, export and a smoke inference.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[bagel_example_job],
    sensors=[registered_data_changed],
    schedules=[weekly_refresh],
    resources={
        "workspace": PipelineWorkspace(root=os.environ.get("BAGEL_WORKSPACE", "data/pipeline")),
        "launch": TrainingLaunch(),
        "launcher": LocalTorchrunLauncher(),
    },
)
