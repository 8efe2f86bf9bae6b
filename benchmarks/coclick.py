"""Co-click mining benchmark: `mine_coclick_pairs` (Polars) against one DuckDB SQL query.

Both engines mine the same synthetic Parquet click log with the same definition (the
recipe in saviorrec_pipeline.method.coclick); each run happens in its own subprocess so that its
peak RSS is its own.
The pair tables must be identical, or the benchmark fails.

    python benchmarks/coclick.py                      # 10^6 and 10^7 events
    python benchmarks/coclick.py --events 1000000     # one size

Writes benchmarks/results/coclick.json. The numbers to read are `alternative_over_ours_seconds`
(DuckDB's seconds over Polars'; > 1: Polars faster), measured in the same run on the same machine,
and the scaling exponent of each engine between the sizes.
"""

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from measure import comparison, measured, polars_beside_duckdb  # benchmarks/, beside this script
from report import write_report

CLICKS_PER_USER = 20
TRAIN_DAYS = 21
SESSION_CLICKS = 5  # a session's clicks fall within 30 minutes; sessions at random hours
ZIPF_EXPONENT = 1.2


def write_click_log(path: Path, events: int, seed: int = 0) -> None:
    """About 20 clicks per user in sessions over 21 days; Zipf-distributed items."""
    rng = np.random.default_rng(seed)
    users = events // CLICKS_PER_USER
    items = max(1000, events // 10)
    user_id = np.sort(rng.integers(0, users, events))
    # Rows are ordered by user, so consecutive runs of SESSION_CLICKS rows form a session
    # (a run may straddle two users, which only splits a session).
    session = np.arange(events) // SESSION_CLICKS
    session_hour = rng.integers(0, TRAIN_DAYS * 24, session[-1] + 1)[session]
    ts_us = (session_hour * 3600 + rng.integers(0, 1800, events)) * 1_000_000
    item_id = (rng.zipf(ZIPF_EXPONENT, events) - 1) % items
    pl.DataFrame(
        {
            "user_id": user_id.astype(np.int64),
            "item_id": item_id.astype(np.int64),
            "ts": pl.Series(ts_us).cast(pl.Datetime("us", "UTC")),
        }
    ).sample(fraction=1.0, shuffle=True, seed=seed).write_parquet(path)


def duckdb_query(path: Path, window: int, max_gap_hours: int, min_support: int) -> str:
    """The co-click definition as one SQL query: `lead` over each user's ordered clicks."""
    leads = ", ".join(f"lead(item_id, {k}) OVER w AS item_{k}, lead(ts, {k}) OVER w AS ts_{k}" for k in range(1, window + 1))
    pairs = " UNION ALL ".join(
        f"SELECT user_id, least(item_id, item_{k}) AS item_a, greatest(item_id, item_{k}) AS item_b FROM ordered "
        f"WHERE item_{k} <> item_id AND ts_{k} - ts <= INTERVAL {max_gap_hours} HOUR"
        for k in range(1, window + 1)
    )
    return f"""
        WITH ordered AS (
            SELECT user_id, item_id, ts, {leads} FROM read_parquet('{path}')
            WINDOW w AS (PARTITION BY user_id ORDER BY ts, item_id)
        ), pairs AS ({pairs})
        SELECT item_a, item_b, count(DISTINCT user_id)::UINTEGER AS support
        FROM pairs GROUP BY item_a, item_b HAVING count(DISTINCT user_id) >= {min_support}
        ORDER BY item_a, item_b
    """


def mine(engine: str, clicks: Path, pairs_out: Path) -> dict:
    """Runs in a child process: mine, write the pairs, report seconds and peak RSS of the mining.
    Each engine is imported here, so a child loads only its own."""
    if engine == "polars":
        from saviorrec_pipeline.method.coclick import CoclickParams, mine_coclick_pairs

        figures, pairs = measured(lambda: mine_coclick_pairs(pl.scan_parquet(clicks), CoclickParams()))
    else:
        import duckdb

        figures, pairs = measured(lambda: pl.from_arrow(duckdb.sql(duckdb_query(clicks, 5, 24, 2)).to_arrow_table()))
    pairs.write_parquet(pairs_out)
    return {**figures, "pairs": pairs.height}


def benchmark(events: int, workdir: Path) -> dict:
    """Both engines on one click log of `events` rows; they must give the same pairs."""
    clicks = workdir / f"clicks_{events}.parquet"
    write_click_log(clicks, events)
    sides = polars_beside_duckdb(__file__, clicks, workdir / f"pairs_{events}")
    for figures in sides.values():
        figures["events_per_s"] = round(events / figures["seconds"])
    return {"size": events, **sides}


def run(sizes: list[int]) -> dict:
    """The report for click logs of each size in `sizes` (events)."""
    with tempfile.TemporaryDirectory() as workdir:
        runs = [benchmark(n, Path(workdir)) for n in sizes]
    return {
        "benchmark": "coclick",
        "definition": "window 5, max_gap 24h, min_support 2",
        "data": f"about {CLICKS_PER_USER} clicks per user in sessions over {TRAIN_DAYS} days, zipf({ZIPF_EXPONENT}) items",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "polars": pl.__version__},
        "stages": [comparison("co-click mining", "click events", "Polars (mine_coclick_pairs)", "DuckDB, one SQL query", runs)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coclick.json")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "CLICKS", "PAIRS_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, clicks, pairs_out = args.child
        print(json.dumps(mine(engine, Path(clicks), Path(pairs_out))))
        return
    write_report(args.out, run(args.events))


if __name__ == "__main__":
    main()
