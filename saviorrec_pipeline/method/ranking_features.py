"""The ranking dataset of paper 3.1: one row per impression with the inputs of eq. 1,

    pCTR_{u,i} = f([ID_u, P_u, Seq_u], [ID_i, S_i, MM_i], pCTR^base_{u,i})

built with Polars as-of joins so that nothing a row holds comes from at or after its cutoff:
- the cutoff of a training row is its own timestamp; the cutoff of an evaluation row is the start
  of the evaluation window, so no event of that window feeds any feature (only labels come from it);
- Seq_u: the user's last N clicked items before the cutoff, oldest first, each with its statistics
  as they stood just before that click;
- S_i: the candidate's impressions, clicks and smoothed CTR before the cutoff;
- pv: the candidate's impressions before the evaluation window (the paper's PV buckets).
MM_i (embeddings, codes) stays by reference: rows carry item ids, the CTR stage looks them up.
"""

import datetime as dt
from dataclasses import dataclass

import polars as pl

TRAIN, EVAL = "train", "eval"


@dataclass(frozen=True)
class FeatureSpec:
    sequence_length: int = 50  # N, the last clicked items kept per impression
    prior_ctr: float = 0.05  # smoothed CTR = (clicks + strength * prior) / (impressions + strength)
    prior_strength: float = 20.0


def smoothed_ctr(clicks: pl.Expr, impressions: pl.Expr, spec: FeatureSpec) -> pl.Expr:
    return ((clicks + spec.prior_strength * spec.prior_ctr) / (impressions + spec.prior_strength)).cast(pl.Float32)


def item_history(impressions: pl.LazyFrame) -> pl.LazyFrame:
    """Per item and timestamp, the running impression and click totals up to and including it."""
    return (
        impressions.group_by("item_id", "ts")
        .agg(pl.len().cast(pl.Int32).alias("n_impressions"), pl.col("clicked").cast(pl.Int32).sum().alias("n_clicks"))
        .sort("item_id", "ts")
        .select(
            "item_id", "ts",
            pl.col("n_impressions").cum_sum().over("item_id").alias("impressions_so_far"),
            pl.col("n_clicks").cum_sum().over("item_id").alias("clicks_so_far"),
        )
        .sort("ts")
    )


def stats_before(queries: pl.LazyFrame, at: str, history: pl.LazyFrame, prefix: str, spec: FeatureSpec) -> pl.LazyFrame:
    """Add `{prefix}impressions`, `{prefix}clicks`, `{prefix}ctr`: the item's totals strictly before `at`."""
    joined = queries.sort(at).join_asof(
        history, left_on=at, right_on="ts", by="item_id", strategy="backward", allow_exact_matches=False, check_sortedness=False,
        suffix="_history", coalesce=False,
    )
    impressions = pl.col("impressions_so_far").fill_null(0)
    clicks = pl.col("clicks_so_far").fill_null(0)
    return joined.with_columns(
        impressions.alias(f"{prefix}impressions"),
        clicks.alias(f"{prefix}clicks"),
        smoothed_ctr(clicks, impressions, spec).alias(f"{prefix}ctr"),
    ).drop("impressions_so_far", "clicks_so_far", "ts_history", "item_id_history", strict=False)


def ranking_input(impressions: pl.DataFrame) -> pl.DataFrame:
    """The impression columns the rows are built from (base pCTR where the data has it)."""
    return impressions.select("user_id", "item_id", "ts", "clicked", *(["base_pctr"] if "base_pctr" in impressions.columns else []))


@dataclass(frozen=True)
class RankingRows:
    rows: pl.DataFrame
    dropped_unknown: int  # impressions of items missing from the catalog


def ranking_rows(
    impressions: pl.DataFrame, catalog_ids: pl.DataFrame, profiles: pl.DataFrame | None, eval_start: dt.datetime, spec: FeatureSpec,
) -> RankingRows:
    """`build_ranking_rows` on frames in memory, and how many impressions it dropped."""
    rows = build_ranking_rows(impressions.lazy(), catalog_ids.lazy(), profiles.lazy() if profiles is not None else None, eval_start, spec)
    return RankingRows(rows.collect(engine="streaming"), impressions.join(catalog_ids, on="item_id", how="anti").height)


def build_ranking_rows(
    impressions: pl.LazyFrame, catalog_ids: pl.LazyFrame, profiles: pl.LazyFrame | None,
    eval_start: dt.datetime, spec: FeatureSpec = FeatureSpec(),
) -> pl.LazyFrame:
    """Rows for every impression of the training and evaluation windows whose item is in the catalog.

    `impressions`: `user_id`, `item_id`, `ts`, `clicked` (+ optional `base_pctr`), both windows;
    `catalog_ids`: `item_id`; `profiles`: `user_id` + profile columns, or None.
    """
    rows, clicks = item_features(impressions.join(catalog_ids.select("item_id"), on="item_id", how="semi"), eval_start, spec)
    return user_features(rows, clicks, profiles, spec)


def item_features(kept: pl.LazyFrame, eval_start: dt.datetime, spec: FeatureSpec) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """What depends on one item's timeline alone: (impression rows with their split, the candidate's
    statistics S_i and pv; click events with the clicked item's statistics just before each). Exact
    on any set of `kept` impressions that holds each of its items' impressions whole."""
    eval_start_lit = pl.lit(eval_start).cast(pl.Datetime("us", "UTC"))
    history = item_history(kept)
    rows = kept.with_columns(
        pl.when(pl.col("ts") >= eval_start_lit).then(pl.lit(EVAL)).otherwise(pl.lit(TRAIN)).alias("split"),
        pl.min_horizontal("ts", eval_start_lit).alias("cutoff"),
    )
    rows = stats_before(rows, "cutoff", history, "item_", spec)
    pv = kept.filter(pl.col("ts") < eval_start_lit).group_by("item_id").agg(pl.len().cast(pl.Int64).alias("pv"))
    rows = rows.join(pv, on="item_id", how="left").with_columns(pl.col("pv").fill_null(0))
    clicks = stats_before(kept.filter(pl.col("clicked") == 1).select("user_id", "item_id", "ts"), "ts", history, "", spec)
    return rows, clicks


def user_features(rows: pl.LazyFrame, clicks: pl.LazyFrame, profiles: pl.LazyFrame | None, spec: FeatureSpec) -> pl.LazyFrame:
    """What depends on one user's history alone: the behaviour sequence Seq_u before each row's
    cutoff and the profile P_u, on `item_features`' output. Exact on any set of rows and clicks
    that holds each of its users' rows and clicks whole."""
    # Each click numbered per user in click order.
    clicks = clicks.sort("user_id", "ts", "item_id").with_columns(pl.int_range(pl.len()).over("user_id").alias("click_number"))
    click_lists = clicks.group_by("user_id").agg(
        pl.col("item_id").alias("all_items"), pl.col("impressions").alias("all_impressions"),
        pl.col("clicks").alias("all_clicks"), pl.col("ctr").alias("all_ctr"),
    )
    # How many of the user's clicks came strictly before the cutoff: the last one's number + 1.
    rows = rows.sort("cutoff").join_asof(
        clicks.select("user_id", "ts", "click_number").sort("ts"), left_on="cutoff", right_on="ts", by="user_id",
        strategy="backward", allow_exact_matches=False, suffix="_click", coalesce=False, check_sortedness=False,
    )
    clicks_before = (pl.col("click_number") + 1).fill_null(0)
    first = (clicks_before - spec.sequence_length).clip(lower_bound=0)
    length = clicks_before - first
    rows = rows.join(click_lists, on="user_id", how="left").with_columns(
        *[
            pl.col(f"all_{name}").list.slice(first, length).fill_null([]).alias(f"seq_{name}")
            for name in ("items", "impressions", "clicks", "ctr")
        ],
        length.cast(pl.Int32).alias("seq_length"),
    ).select(pl.exclude("pv"), "pv")
    if profiles is not None:
        rows = rows.join(profiles, on="user_id", how="left")
    dropped = ["cutoff", "click_number", "ts_click", "user_id_click", "all_items", "all_impressions", "all_clicks", "all_ctr"]
    return rows.drop(dropped, strict=False).sort("ts", "user_id", "item_id")
