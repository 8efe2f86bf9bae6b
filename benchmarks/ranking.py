"""Ranking join benchmark: the `ranking_dataset` join (Polars as-of joins) beside the same join as
one DuckDB query over the same Parquet, at two or more sizes.

    python benchmarks/ranking.py                  # demo data at scale 3 and 30 (~10^6, ~10^7 impressions)
    python benchmarks/ranking.py --scales 3       # one size

Impressions come from the demo generator (`saviorrec generate-demo --scale S`); each join runs in
its own subprocess (which imports no PyTorch) so that its peak RSS is the join's, and both engines
must give the same rows, or the benchmark fails. Writes benchmarks/results/ranking.json; the
numbers to read are `alternative_over_ours_seconds` (DuckDB's seconds over Polars') and the
scaling exponents.
"""

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import polars as pl

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.ranking_features import FeatureSpec, build_ranking_rows

from measure import comparison, measured, polars_beside_duckdb  # benchmarks/, beside this script
from report import write_report


def eval_start(raw: Path) -> dt.datetime:
    """The start of the demo's evaluation window: its last day."""
    last = max(p.name.removeprefix("date=") for p in (raw / "impressions").glob("date=*"))
    return dt.datetime.combine(dt.date.fromisoformat(last), dt.time(), tzinfo=dt.timezone.utc)


def impression_count(raw: Path) -> int:
    return pl.scan_parquet(f"{raw}/impressions/*/*.parquet").select(pl.len()).collect().item()


def polars_rows(raw: Path) -> pl.DataFrame:
    impressions = pl.scan_parquet(f"{raw}/impressions/*/*.parquet").select("user_id", "item_id", "ts", "clicked", "base_pctr")
    catalog = pl.scan_parquet(f"{raw}/items/*.parquet").select("item_id")
    users = pl.scan_parquet(f"{raw}/users/*.parquet")
    return build_ranking_rows(impressions, catalog, users, eval_start(raw)).collect(engine="streaming")


def duckdb_query(raw: Path, window_start: dt.datetime, spec: FeatureSpec = FeatureSpec()) -> str:
    """`build_ranking_rows` as one SQL query: ASOF joins with a strict `>` for "strictly before"."""
    def smoothed_ctr(clicks: str, impressions: str) -> str:
        return f"(({clicks} + {spec.prior_strength * spec.prior_ctr}) / ({impressions} + {spec.prior_strength}))::FLOAT"

    sequence_sources = {"items": "item_id", "impressions": "impressions", "clicks": "clicks", "ctr": "ctr"}
    click_lists = ", ".join(f"list({column} ORDER BY ts, item_id) AS all_{name}" for name, column in sequence_sources.items())
    first = f"greatest(clicks_before - {spec.sequence_length}, 0)"
    sequences = ", ".join(f"coalesce(list_slice(all_{name}, {first} + 1, clicks_before), []) AS seq_{name}" for name in sequence_sources)
    window = f"TIMESTAMPTZ '{window_start.isoformat()}'"
    return f"""
        WITH kept AS (
            SELECT i.user_id, i.item_id, i.ts, i.clicked, i.base_pctr FROM read_parquet('{raw}/impressions/*/*.parquet') i
            SEMI JOIN read_parquet('{raw}/items/*.parquet') c ON i.item_id = c.item_id
        ), history AS (  -- per item and timestamp, running totals up to and including it
            SELECT item_id, ts,
                sum(count(*)) OVER (PARTITION BY item_id ORDER BY ts)::INTEGER AS impressions_so_far,
                sum(sum(clicked)) OVER (PARTITION BY item_id ORDER BY ts)::INTEGER AS clicks_so_far
            FROM kept GROUP BY item_id, ts
        ), clicks AS (  -- each click with the clicked item's statistics just before it, numbered per user
            SELECT c.user_id, c.item_id, c.ts,
                coalesce(h.impressions_so_far, 0) AS impressions, coalesce(h.clicks_so_far, 0) AS clicks,
                {smoothed_ctr("coalesce(h.clicks_so_far, 0)", "coalesce(h.impressions_so_far, 0)")} AS ctr,
                row_number() OVER (PARTITION BY c.user_id ORDER BY c.ts, c.item_id) AS click_number
            FROM (SELECT user_id, item_id, ts FROM kept WHERE clicked = 1) c
            ASOF LEFT JOIN history h ON c.item_id = h.item_id AND c.ts > h.ts
        ), click_lists AS (
            SELECT user_id, {click_lists} FROM clicks GROUP BY user_id
        ), clicks_through AS (  -- how many of the user's clicks came up to and including ts
            SELECT user_id, ts, max(click_number) AS clicks_through FROM clicks GROUP BY user_id, ts
        ), pv AS (
            SELECT item_id, count(*) AS pv FROM kept WHERE ts < {window} GROUP BY item_id
        ), rows AS (
            SELECT r.* EXCLUDE (cutoff), CASE WHEN r.ts >= {window} THEN 'eval' ELSE 'train' END AS split,
                coalesce(h.impressions_so_far, 0) AS item_impressions, coalesce(h.clicks_so_far, 0) AS item_clicks,
                {smoothed_ctr("coalesce(h.clicks_so_far, 0)", "coalesce(h.impressions_so_far, 0)")} AS item_ctr,
                coalesce(k.clicks_through, 0) AS clicks_before
            FROM (SELECT *, least(ts, {window}) AS cutoff FROM kept) r
            ASOF LEFT JOIN history h ON r.item_id = h.item_id AND r.cutoff > h.ts
            ASOF LEFT JOIN clicks_through k ON r.user_id = k.user_id AND r.cutoff > k.ts
        )
        SELECT rows.* EXCLUDE (clicks_before), {sequences}, (clicks_before - {first})::INTEGER AS seq_length,
            coalesce(pv.pv, 0) AS pv, users.* EXCLUDE (user_id)
        FROM rows LEFT JOIN click_lists USING (user_id) LEFT JOIN pv USING (item_id)
        LEFT JOIN read_parquet('{raw}/users/*.parquet') users USING (user_id)
        ORDER BY ts, user_id, item_id
    """


def duckdb_rows(raw: Path) -> pl.DataFrame:
    import duckdb  # here, not at the top: the Polars child never loads it, so its peak RSS is its own

    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")  # timestamps come back in UTC, as the Parquet holds them
    return pl.from_arrow(connection.sql(duckdb_query(raw, eval_start(raw))).to_arrow_table())


def join_once(engine: str, raw: Path, out: Path) -> dict:
    """Child process: build the rows with one engine, write them; seconds and peak RSS of the join."""
    figures, rows = measured(lambda: (polars_rows if engine == "polars" else duckdb_rows)(raw))
    rows.write_parquet(out)
    return {**figures, "rows": rows.height}


def join_benchmark(scale: float, folder: Path) -> dict:
    """Both engines on demo data at `scale`; they must give the same rows, column order included."""
    raw = folder / f"raw-{scale:g}"
    generate_demo(raw, DemoSpec(scale=scale))
    sides = polars_beside_duckdb(__file__, raw, folder / f"rows-{scale:g}")
    for figures in sides.values():
        figures["rows_per_s"] = round(figures["rows"] / figures["seconds"])
    return {"size": impression_count(raw), "scale": scale, **sides}


def run(scales: list[float]) -> dict:
    """The report: the join at each demo scale."""
    with tempfile.TemporaryDirectory() as folder:
        joins = [join_benchmark(scale, Path(folder)) for scale in scales]
    return {
        "benchmark": "ranking",
        "stages": [comparison("ranking join", "impressions", "Polars as-of joins (build_ranking_rows)", "DuckDB, one SQL query", joins)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[3, 30])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ranking.json")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, raw, out = args.child
        print(json.dumps(join_once(engine, Path(raw), Path(out))))
        return
    write_report(args.out, run(args.scales))


if __name__ == "__main__":
    main()
