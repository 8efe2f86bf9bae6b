"""A sensor that starts the chain for a day as soon as its raw impressions land."""

import dagster as dg

from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.resources.raw import RawStore


@dg.sensor(
    job=chain_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,  # switched on in the UI where raw data arrives daily
    description="Starts saviorrec_chain for each day whose impressions/date=D/ folder gains Parquet files.",
)
def raw_day_landed(context: dg.SensorEvaluationContext, raw: RawStore) -> dg.SensorResult:
    seen = context.cursor or ""  # the last day already requested, ISO format
    partitions = set(daily_partitions.get_partition_keys())
    new_days = [day.isoformat() for day in raw.days_with_impressions() if day.isoformat() > seen]
    requests = [
        dg.RunRequest(run_key=f"raw-{day}", partition_key=day, tags={"saviorrec/trigger": "raw_day_landed"})
        for day in new_days
        if day in partitions
    ]
    skipped = [day for day in new_days if day not in partitions]
    if skipped:
        context.log.info(f"raw days outside the partitions ({daily_partitions.start:%Y-%m-%d} .. today): {', '.join(skipped)}")
    return dg.SensorResult(run_requests=requests, cursor=max(new_days, default=seen) or None)

