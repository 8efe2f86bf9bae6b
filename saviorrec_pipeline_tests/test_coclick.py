"""Co-click mining against a brute-force reading of the definition."""

import datetime as dt
from collections import defaultdict

import numpy as np
import polars as pl
import pytest

from saviorrec_pipeline.method import coclick
from saviorrec_pipeline.method.coclick import CoclickParams, mine_coclick_pairs

pytestmark = pytest.mark.unit

T0 = dt.datetime(2025, 7, 1, tzinfo=dt.timezone.utc)


def brute_force(clicks: list[tuple[int, int, dt.datetime]], params: CoclickParams) -> dict[tuple[int, int], int]:
    """The definition, literally: per user, sort by (ts, item); pair each click with the next
    `window` clicks within `max_gap`; count distinct users per unordered pair."""
    by_user = defaultdict(list)
    for user, item, ts in clicks:
        by_user[user].append((ts, item))
    users_of_pair = defaultdict(set)
    for user, events in by_user.items():
        events.sort()
        for i, (ts, item) in enumerate(events):
            for later_ts, later_item in events[i + 1 : i + 1 + params.window]:
                if later_ts - ts <= params.max_gap and later_item != item:
                    users_of_pair[(min(item, later_item), max(item, later_item))].add(user)
    return {pair: len(users) for pair, users in users_of_pair.items() if len(users) >= params.min_support}


def frame(clicks) -> pl.DataFrame:
    users, items, stamps = zip(*clicks) if clicks else ((), (), ())
    return pl.DataFrame(
        {"user_id": list(users), "item_id": list(items), "ts": list(stamps)},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC")},
    )


def mined(clicks, params) -> dict[tuple[int, int], int]:
    out = mine_coclick_pairs(frame(clicks), params)
    assert out.columns == ["item_a", "item_b", "support"]
    assert (out["item_a"] < out["item_b"]).all()
    assert out.sort("item_a", "item_b").equals(out), "rows come sorted, so re-runs are identical"
    return {(a, b): s for a, b, s in out.iter_rows()}


def random_clicks(seed: int, n: int, users: int, items: int, span: dt.timedelta):
    rng = np.random.default_rng(seed)
    # Coarse timestamps (whole minutes) so ties on ts are common; zipf items so pairs repeat.
    minutes = rng.integers(0, int(span.total_seconds() // 60), n)
    return [
        (int(u), int(i), T0 + dt.timedelta(minutes=int(m)))
        for u, i, m in zip(rng.integers(0, users, n), rng.zipf(1.5, n) % items, minutes)
    ]


@pytest.mark.parametrize(
    "seed,params",
    [
        (0, CoclickParams()),
        (1, CoclickParams(window=1, max_gap=dt.timedelta(hours=1), min_support=1)),
        (2, CoclickParams(window=3, max_gap=dt.timedelta(hours=6), min_support=2)),
        (3, CoclickParams(window=10, max_gap=dt.timedelta(days=3), min_support=3)),
        (4, CoclickParams(window=5, max_gap=dt.timedelta(0), min_support=1)),
    ],
)
def test_matches_brute_force_on_random_logs(seed, params):
    clicks = random_clicks(seed, n=4000, users=60, items=40, span=dt.timedelta(days=3))
    expected = brute_force(clicks, params)
    assert len(expected) > 5, "the random log must produce pairs for the test to mean anything"
    assert mined(clicks, params) == expected


@pytest.mark.parametrize("key_bits", [16, 13])
def test_pairs_whose_keys_do_not_fit_are_mined_in_partitions_with_the_same_result(monkeypatch, key_bits):
    """40 items and 60 users need 6 + 6 + 6 bits per (item_a, item_b, user) key: narrower keys make
    the top 2 or 5 bits of item_a a partition (as 10^6 items and 10^8 users would at 64 bits)."""
    clicks = random_clicks(5, n=4000, users=60, items=40, span=dt.timedelta(days=3))
    expected = brute_force(clicks, CoclickParams(min_support=1))
    monkeypatch.setattr(coclick, "KEY_BITS", key_bits)
    assert mined(clicks, CoclickParams(min_support=1)) == expected


def test_window_boundary_counts_the_kth_next_click_but_not_the_next_one():
    # user 1 clicks items 10, 11, 12, 13 one minute apart; with window=2, 10 pairs with 11 and 12 only.
    clicks = [(u, 10 + k, T0 + dt.timedelta(minutes=k)) for u in (1, 2) for k in range(4)]
    pairs = mined(clicks, CoclickParams(window=2, min_support=2))
    assert pairs == {(10, 11): 2, (10, 12): 2, (11, 12): 2, (11, 13): 2, (12, 13): 2}


def test_gap_boundary_is_inclusive():
    gap = dt.timedelta(hours=24)
    exactly = [(u, 1, T0) for u in (1, 2)] + [(u, 2, T0 + gap) for u in (1, 2)]
    just_over = [(u, 3, T0) for u in (3, 4)] + [(u, 4, T0 + gap + dt.timedelta(microseconds=1)) for u in (3, 4)]
    assert mined(exactly + just_over, CoclickParams(max_gap=gap)) == {(1, 2): 2}


def test_repeated_item_is_never_paired_with_itself_but_takes_a_window_slot():
    # 5, 5, 6: with window=1 the second 5 pairs with 6; the first 5 only meets itself.
    clicks = [(u, i, T0 + dt.timedelta(minutes=k)) for u in (1, 2) for k, i in enumerate([5, 5, 6])]
    assert mined(clicks, CoclickParams(window=1)) == {(5, 6): 2}
    # 5, 5, 6 with the repeat filling the only slot of the first click: (5, 6) still from the second.
    clicks = [(u, i, T0 + dt.timedelta(minutes=k)) for u in (1, 2) for k, i in enumerate([5, 6, 6, 7])]
    assert mined(clicks, CoclickParams(window=1)) == {(5, 6): 2, (6, 7): 2}


def test_support_counts_distinct_users_not_occurrences():
    # One user clicks 1 then 2 ten times: support 1, below min_support 2.
    clicks = [(7, i, T0 + dt.timedelta(hours=h, minutes=m)) for h in range(10) for m, i in enumerate([1, 2])]
    assert mined(clicks, CoclickParams()) == {}
    assert mined(clicks + [(8, 2, T0), (8, 1, T0 + dt.timedelta(minutes=1))], CoclickParams()) == {(1, 2): 2}


def test_one_click_users_and_empty_input_give_no_pairs():
    assert mined([(u, u, T0) for u in range(50)], CoclickParams(min_support=1)) == {}
    assert mined([], CoclickParams()) == {}


def test_ties_on_ts_are_ordered_by_item_id():
    # Same timestamp for 30, 20, 10: order is 10, 20, 30, so window=1 gives (10,20) and (20,30).
    clicks = [(u, i, T0) for u in (1, 2) for i in (30, 20, 10)]
    assert mined(clicks, CoclickParams(window=1)) == {(10, 20): 2, (20, 30): 2}


def test_pairs_never_cross_users():
    # user 1's last click and user 2's first click are adjacent in a sorted frame.
    clicks = [(1, 1, T0), (1, 2, T0 + dt.timedelta(minutes=1)), (2, 3, T0), (2, 4, T0 + dt.timedelta(minutes=1))]
    assert mined(clicks, CoclickParams(min_support=1)) == {(1, 2): 1, (3, 4): 1}


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="window"):
        CoclickParams(window=0)
    with pytest.raises(ValueError, match="min_support"):
        CoclickParams(min_support=0)
