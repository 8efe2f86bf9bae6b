"""Daily partitions and the train/eval window shared by every stage.

Partition D is the day evaluated. The evaluation window is the `eval_days` days ending at D; the
training window is the `train_days` days just before it. Nothing computed for D may use an event
of the evaluation window except the evaluation itself.
"""

import datetime as dt

import dagster as dg

from saviorrec_pipeline.settings import load_settings

SETTINGS = load_settings()

daily_partitions = dg.DailyPartitionsDefinition(start_date=SETTINGS.start_date.isoformat())


class TrainEvalWindow(dg.ConfigurableResource):
    """One window for the whole run, so every stage of it sees the same days."""

    train_days: int = SETTINGS.train_days
    eval_days: int = SETTINGS.eval_days

    def evaluation_days(self, partition_key: str) -> list[dt.date]:
        last = dt.date.fromisoformat(partition_key)
        return [last - dt.timedelta(days=i) for i in reversed(range(self.eval_days))]

    def training_days(self, partition_key: str) -> list[dt.date]:
        first_eval = self.evaluation_days(partition_key)[0]
        return [first_eval - dt.timedelta(days=i) for i in reversed(range(1, self.train_days + 1))]


def training_window_mapping() -> dg.TimeWindowPartitionMapping:
    """Lineage from partition D to the raw days of its training window (for the UI graph)."""
    return dg.TimeWindowPartitionMapping(
        start_offset=-(SETTINGS.train_days + SETTINGS.eval_days - 1),
        end_offset=-SETTINGS.eval_days,
        allow_nonexistent_upstream_partitions=True,
    )


def full_window_mapping() -> dg.TimeWindowPartitionMapping:
    """Lineage from partition D to the raw days of its training and evaluation windows."""
    return dg.TimeWindowPartitionMapping(
        start_offset=-(SETTINGS.train_days + SETTINGS.eval_days - 1),
        end_offset=0,
        allow_nonexistent_upstream_partitions=True,
    )
