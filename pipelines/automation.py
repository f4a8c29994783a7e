"""Re-training triggers: a sensor that notices changed data and a weekly schedule (both start stopped),
and a sensor that evaluates each new checkpoint.

The first two target ``train_job``: index, statistics, manifest and training on whatever ``dataset_registry``
registered last (the example, your registry YAML, or an upstream ``dataset_info.py``).
"""

import dagster as dg

from assets.resources import PipelineWorkspace
from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import Registry

JOB_NAME = "train_job"


@dg.sensor(
    job_name=JOB_NAME,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Retrains (train_job) when a registered dataset gains, loses or changes a file (name, size or "
    "mtime); the cursor and run keys make each change run once.",
)
def dataset_change_sensor(context: dg.SensorEvaluationContext, workspace: PipelineWorkspace):
    # Cheap by design (sensor ticks have a 60 s deadline): directory listings and stat() only.
    if not workspace.registry_path.is_file():
        return dg.SkipReason(f"no registry yet at {workspace.registry_path}; materialise dataset_registry first")
    try:
        fingerprint = Registry.load(workspace.registry_path).fingerprint()
    except ConfigError as exc:
        return dg.SkipReason(f"registry unreadable: {exc}")
    if fingerprint == context.cursor:
        return dg.SkipReason("registered data unchanged")
    if context.cursor is None:
        # First tick: remember the current state; the data as it is now has already been processed.
        context.update_cursor(fingerprint)
        return dg.SkipReason("recorded the current data fingerprint")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint, tags={"bagel/trigger": "data_changed"})


CHECKPOINT_SMOKE_JOB = "checkpoint_smoke_job"


@dg.sensor(
    job_name=CHECKPOINT_SMOKE_JOB,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Evaluates every newly recorded checkpoint: one checkpoint_smoke run per new checkpoint "
    "partition (an image and an answer from that step); the cursor is the event log position.",
)
def new_checkpoint_sensor(context: dg.SensorEvaluationContext):
    latest = context.instance.fetch_materializations(dg.AssetKey("checkpoint"), limit=1).records
    if context.cursor is None:
        # First tick: start from now; checkpoints recorded before the sensor was switched on are not re-evaluated.
        context.update_cursor(str(latest[0].storage_id if latest else 0))
        return dg.SkipReason("recorded the current position; new checkpoints from now on are evaluated")
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("checkpoint"), after_storage_id=int(context.cursor)),
        limit=100,
        ascending=True,
    )
    if not result.records:
        return dg.SkipReason("no new checkpoint")
    context.update_cursor(str(result.records[-1].storage_id))
    partitions = list(dict.fromkeys(r.asset_materialization.partition for r in result.records))
    tags = {"bagel/trigger": "new_checkpoint"}
    return [dg.RunRequest(run_key=key, partition_key=key, tags=tags) for key in partitions]


retrain_schedule = dg.ScheduleDefinition(
    name="retrain_schedule",
    job_name=JOB_NAME,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain on the registered data every Monday 03:00 UTC.",
)
