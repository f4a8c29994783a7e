"""The one Dagster ``Definitions`` object of bagel-pipeline (``dagster ... -m pipelines``)."""

from pipelines.definitions import defs

__all__ = ["defs"]
