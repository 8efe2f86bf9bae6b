"""Ranking rows: features from strictly earlier data, checked against a brute-force recount."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from saviorrec_pipeline.method.ranking_features import FeatureSpec, build_ranking_rows

pytestmark = pytest.mark.unit

EVAL_START = dt.datetime(2025, 7, 4, tzinfo=dt.timezone.utc)
SPEC = FeatureSpec(sequence_length=4, prior_ctr=0.1, prior_strength=10.0)
FEATURES = ["item_impressions", "item_clicks", "item_ctr", "seq_items", "seq_impressions", "seq_clicks", "seq_ctr", "seq_length"]


def _impressions(rows: int = 3000, seed: int = 0) -> pl.DataFrame:
    """Four days (three of training, one evaluated), a few users and items, coarse timestamps so
    that ties (several events in the same second) happen."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2025, 7, 1, tzinfo=dt.timezone.utc)
    seconds = np.sort(rng.integers(0, 4 * 86400 // 600, rows)) * 600
    return pl.DataFrame(
        {
            "user_id": rng.integers(1, 30, rows),
            "item_id": rng.integers(1, 40, rows),
            "ts": [start + dt.timedelta(seconds=int(s)) for s in seconds],
            "clicked": (rng.random(rows) < 0.3).astype(np.int8),
            "base_pctr": rng.random(rows).astype(np.float32),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us")).unique(["user_id", "item_id", "ts"], maintain_order=True)


def _build(impressions: pl.DataFrame, catalog: pl.DataFrame | None = None) -> pl.DataFrame:
    catalog = catalog if catalog is not None else pl.DataFrame({"item_id": np.arange(1, 40)})
    return build_ranking_rows(impressions.lazy(), catalog.lazy(), None, EVAL_START, SPEC).collect(engine="streaming")


def test_features_match_a_brute_force_recount():
    impressions = _impressions(rows=1500)
    rows = _build(impressions)
    assert rows.height == impressions.height
    events = impressions.to_dicts()
    for row in rows.sample(150, seed=1).iter_rows(named=True):
        cutoff = min(row["ts"], EVAL_START)
        earlier = [e for e in events if e["item_id"] == row["item_id"] and e["ts"] < cutoff]
        clicks = sum(e["clicked"] for e in earlier)
        assert (row["item_impressions"], row["item_clicks"]) == (len(earlier), clicks)
        assert row["item_ctr"] == pytest.approx((clicks + 1.0) / (len(earlier) + 10.0), rel=1e-6)
        assert row["pv"] == sum(1 for e in events if e["item_id"] == row["item_id"] and e["ts"] < EVAL_START)
        assert row["split"] == ("eval" if row["ts"] >= EVAL_START else "train")
        user_clicks = sorted(
            (e for e in events if e["user_id"] == row["user_id"] and e["clicked"] and e["ts"] < cutoff),
            key=lambda e: (e["ts"], e["item_id"]),
        )[-SPEC.sequence_length :]
        assert row["seq_items"] == [e["item_id"] for e in user_clicks]
        # Each sequence item carries its statistics from just before that click.
        for item, impressions_then, click in zip(row["seq_items"], row["seq_impressions"], user_clicks):
            assert impressions_then == sum(1 for e in events if e["item_id"] == item and e["ts"] < click["ts"])


def test_changing_or_removing_later_events_leaves_features_unchanged():
    impressions = _impressions()
    rows = _build(impressions)
    for cut in (dt.datetime(2025, 7, 2, 13, tzinfo=dt.timezone.utc), EVAL_START + dt.timedelta(hours=9)):
        later = pl.col("ts") > cut
        # Flip every later label and drop a third of the later events.
        changed = impressions.with_columns(pl.when(later).then(1 - pl.col("clicked")).otherwise(pl.col("clicked")).alias("clicked"))
        changed = changed.filter(~later | (pl.int_range(pl.len()) % 3 != 0))
        again = _build(changed)
        key = ["user_id", "item_id", "ts"]
        before = rows.filter(pl.col("ts") <= cut).select(key + FEATURES)
        after = again.filter(pl.col("ts") <= cut).select(key + FEATURES)
        assert before.height > 100
        assert before.equals(after)


def test_items_missing_from_the_catalog_are_dropped():
    impressions = _impressions(rows=500)
    catalog = pl.DataFrame({"item_id": np.arange(1, 20)})
    rows = _build(impressions, catalog)
    assert rows.height == impressions.filter(pl.col("item_id") < 20).height
    assert rows["item_id"].max() < 20
    assert all(item < 20 for items in rows["seq_items"] for item in items)
