"""The daily retrain: the whole chain for yesterday's partition."""

import dagster as dg

from saviorrec_pipeline.jobs import chain_job

# Runs at 02:00 UTC for the day that just ended (Dagster's partitioned-job schedule picks the
# latest complete daily partition); each run is tagged with that partition (dagster/partition).
daily_retrain = dg.build_schedule_from_partitioned_job(
    chain_job,
    name="daily_retrain",
    hour_of_day=2,
    description="Retrain the whole chain every day for the day that just ended.",
    tags={"saviorrec/trigger": "daily_retrain"},
)
