"""The demo generator: deterministic, inside the raw contract, with its planted structure present.

The structure checks are the ones the pipeline's claims rest on, so each would fail on data
without that structure (uniform exposure, random clicks, content unrelated to topics).
"""

import datetime as dt
import io
import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.demo.generator import TITLE_FILLERS
from saviorrec_pipeline.resources.raw import RawStore

pytestmark = pytest.mark.unit

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=6, users=200, items=300, seed=3)
DAYS = [SPEC.start_date + dt.timedelta(days=i) for i in range(SPEC.days)]
UTC_US = pa.timestamp("us", tz="UTC")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    generate_demo(out, SPEC)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _impressions(demo: Path) -> pl.DataFrame:
    """All impressions with the planted truth: the item's topic and group, the user's groups."""
    frame = pl.concat(RawStore(root=str(demo)).read_impressions(day) for day in DAYS)
    items = pl.read_parquet(demo / "ground_truth" / "items.parquet")
    users = pl.read_parquet(demo / "ground_truth" / "users.parquet")
    return frame.join(items, on="item_id").join(users, on="user_id").with_columns(
        preferred=(pl.col("topic_group") == pl.col("preferred_group"))
        | (pl.col("topic_group") == pl.col("second_group")).fill_null(False)
    )


def _catalog(demo: Path) -> pl.DataFrame:
    return pl.read_parquet(demo / "items" / "part-0.parquet").join(
        pl.read_parquet(demo / "ground_truth" / "items.parquet"), on="item_id"
    )


def test_same_seed_gives_identical_bytes_and_another_seed_other_data(demo, tmp_path):
    summary = generate_demo(tmp_path / "again", SPEC)
    expected = _files(demo)
    assert _files(tmp_path / "again") == expected
    assert len(expected) == SPEC.days + 4  # day files, items, users, two ground-truth files

    generate_demo(tmp_path / "other", DemoSpec(**{**SPEC.__dict__, "seed": SPEC.seed + 1}))
    other = _files(tmp_path / "other")
    assert other.keys() == expected.keys()
    assert all(other[name] != expected[name] for name in expected)

    impressions = pl.read_parquet(demo / "impressions" / "*" / "*.parquet")
    assert (summary.impressions, summary.clicks) == (impressions.height, impressions["clicked"].sum())
    assert (summary.users, summary.items, summary.days) == (SPEC.users, SPEC.items, SPEC.days)
    assert (summary.first_day, summary.last_day) == (DAYS[0], DAYS[-1])
    assert f"{summary.impressions:,} impressions" in str(summary)


def test_output_satisfies_the_raw_contract_with_its_exact_types(demo):
    store = RawStore(root=str(demo))
    for day in DAYS:
        read = store.inspect_impressions(day)
        assert read.violations == [] and read.frame.height > 0
        assert read.duplicates_dropped == 0
    items, users = store.inspect_items(), store.inspect_users()
    assert items.violations == [] and items.frame.height == SPEC.items
    assert users.violations == [] and users.frame.height == SPEC.users

    day_file = demo / "impressions" / f"date={DAYS[0]}" / "part-0.parquet"
    assert pq.read_schema(day_file) == pa.schema([
        ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", UTC_US),
        ("clicked", pa.int8()), ("base_pctr", pa.float32()), ("request_id", pa.int64()),
    ])
    assert pq.read_schema(demo / "items" / "part-0.parquet") == pa.schema([
        ("item_id", pa.int64()), ("title", pa.string()), ("image", pa.binary()),
        ("created_at", UTC_US), ("category", pa.string()),
    ])
    profile = pq.read_schema(demo / "users" / "part-0.parquet")
    assert profile.names[0] == "user_id" and len(profile.names) >= 3
    assert all(pa.types.is_string(t) for t in profile.types[1:])


def test_rows_are_sorted_and_request_ids_belong_to_one_user_and_day(demo):
    days = [pl.read_parquet(demo / "impressions" / f"date={day}" / "part-0.parquet") for day in DAYS]
    for frame in days:
        assert frame.equals(frame.sort("ts", "user_id", "item_id"))
    requests = pl.concat(days).group_by("request_id").agg(
        pl.col("user_id").n_unique(), pl.col("ts").dt.date().n_unique()
    )
    assert requests["user_id"].max() == 1 and requests["ts"].max() == 1


def test_clicks_follow_the_users_preferred_groups_and_base_pctr_does_not(demo):
    rows = _impressions(demo)
    assert 0.03 < rows["clicked"].mean() < 0.10
    by_preference = {key[0]: frame for key, frame in rows.group_by("preferred")}
    ctr = {key: frame["clicked"].mean() for key, frame in by_preference.items()}
    assert ctr[True] > 4 * ctr[False]
    # The main scenario's score is blind to the affinity that drives clicks...
    base = {key: frame["base_pctr"].mean() for key, frame in by_preference.items()}
    assert base[True] == pytest.approx(base[False], rel=0.2)
    # ...but not to user propensity and item quality: among non-preferred impressions, the
    # clicked ones have a clearly higher score.
    other = by_preference[False]
    clicked_score = other.filter(pl.col("clicked") == 1)["base_pctr"].mean()
    assert clicked_score > 1.3 * other.filter(pl.col("clicked") == 0)["base_pctr"].mean()


def test_exposure_is_long_tailed(demo):
    pv = _impressions(demo).group_by("item_id").len()["len"].sort(descending=True)
    top_decile_share = pv.head(SPEC.items // 10).sum() / pv.sum()
    assert top_decile_share > 0.5
    assert pv.median() < 0.5 * pv.mean()


def test_new_items_arrive_daily_get_seen_and_never_before_creation(demo):
    items = pl.read_parquet(demo / "items" / "part-0.parquet").select("item_id", "created_at")
    rows = _impressions(demo).join(items, on="item_id")
    assert rows.filter(pl.col("ts") < pl.col("created_at")).is_empty()

    created_on = items["created_at"].dt.date()
    assert (created_on < DAYS[0]).sum() > 0
    assert set(DAYS) <= set(created_on.to_list())
    # Cold items are not left unseen: in their first two days, most items created before the
    # last day get a handful of impressions (popularity alone would give most of them 0-3 here).
    new = items.filter(pl.col("created_at").dt.date().is_between(DAYS[0], DAYS[-2]))
    early = rows.filter(pl.col("ts") < pl.col("created_at") + dt.timedelta(days=2)).group_by("item_id").len()
    pv = new.join(early, on="item_id", how="left")["len"].fill_null(0)
    assert (pv >= 5).mean() > 0.7


def test_a_users_impressions_come_in_sessions(demo):
    gaps = (
        _impressions(demo)
        .sort("user_id", "ts")
        .select(pl.col("ts").diff().over("user_id", pl.col("ts").dt.date()).dt.total_seconds().alias("gap"))
        .drop_nulls()["gap"]
    )
    assert gaps.median() < 60  # within a session, seconds apart
    assert (gaps > 3600).sum() > 0  # between sessions, hours apart


def test_images_are_pngs_that_show_the_topic_and_not_the_group(demo):
    items = _catalog(demo).filter(pl.col("image").is_not_null())
    decoded = [Image.open(io.BytesIO(png)) for png in items["image"]]
    assert {(image.format, image.mode, image.size) for image in decoded} == {("PNG", "RGB", (SPEC.image_size,) * 2)}

    colour = np.stack([np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0) for image in decoded])
    distance = np.linalg.norm(colour[:, None] - colour[None], axis=-1)
    topic, group = items["topic"].to_numpy(), items["topic_group"].to_numpy()
    same_topic = (topic[:, None] == topic[None]) & ~np.eye(len(topic), dtype=bool)
    same_group_other_topic = (group[:, None] == group[None]) & (topic[:, None] != topic[None])
    other_group = group[:, None] != group[None]
    assert distance[same_topic].mean() < 0.5 * distance[other_group].mean()
    # Content must not give the group away: that is what co-click alignment has to learn.
    assert distance[same_group_other_topic].mean() > 0.7 * distance[other_group].mean()


def test_titles_use_their_topics_vocabulary(demo):
    words = (
        _catalog(demo)
        .filter(pl.col("title").is_not_null())
        .select("topic", pl.col("title").str.to_lowercase().str.split(" ").alias("word"))
        .explode("word")
    )
    topics_per_word = words.group_by("word").agg(pl.col("topic").n_unique().alias("topics"))
    shared = set(topics_per_word.filter(pl.col("topics") > 1)["word"].to_list())
    assert shared <= set(TITLE_FILLERS)
    assert words["word"].is_in(list(TITLE_FILLERS)).mean() < 0.4
    # Titles of one topic share words; titles of different topics share only fillers.
    titles = _catalog(demo).filter(pl.col("title").is_not_null()).head(80)
    bags = [set(t.lower().split()) - set(TITLE_FILLERS) for t in titles["title"]]
    topic = titles["topic"].to_list()
    overlap = {True: [], False: []}
    for i, j in itertools.combinations(range(len(bags)), 2):
        overlap[topic[i] == topic[j]].append(len(bags[i] & bags[j]))
    assert np.mean(overlap[True]) > 0.5 and np.mean(overlap[False]) == 0


def test_some_items_lack_an_image_or_a_title_but_none_both(demo):
    items = pl.read_parquet(demo / "items" / "part-0.parquet")
    no_image, no_title = items["image"].is_null(), items["title"].is_null()
    assert 0 < no_image.sum() < 0.15 * items.height
    assert 0 < no_title.sum() < no_image.sum()
    assert not (no_image & no_title).any()


def test_scale_multiplies_users_and_items(tmp_path):
    summary = generate_demo(tmp_path / "half", DemoSpec(days=2, users=200, items=300, seed=1, scale=0.5))
    assert (summary.users, summary.items) == (100, 150)
    assert pl.read_parquet(tmp_path / "half" / "users" / "part-0.parquet").height == 100
    assert pl.read_parquet(tmp_path / "half" / "items" / "part-0.parquet").height == 150


def test_refuses_a_non_empty_output_directory_and_leaves_it_alone(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        generate_demo(tmp_path, DemoSpec(days=2, users=10, items=10))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"days": 1}, "days must be >= 2"),
        ({"users": 0}, "users must be positive"),
        ({"items": -3}, "items must be positive"),
        ({"scale": 0.0}, "scale must be positive"),
        ({"scale": 1e-5}, "leaves no users or no items"),
        ({"topics": 10, "topic_groups": 4}, "split evenly"),
        ({"impressions_per_active_day": 0.5}, "impressions_per_active_day"),
        ({"missing_image_rate": 1.0}, "missing_image_rate"),
        ({"modalities": "video"}, "modalities must be one of"),
        ({"activity": 0.7}, "activity must be in"),
    ],
)
def test_invalid_specs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DemoSpec(**changes)


def test_other_shapes_stay_inside_the_contract(tmp_path):
    small = dict(start_date=dt.date(2025, 7, 1), days=4, users=150, items=200, seed=2)
    shapes = {
        "text": DemoSpec(**small, modalities="text", base_pctr=False, profile="numeric"),
        "image": DemoSpec(**small, modalities="image", click_bias=-2.5, activity=0.2),
    }
    reads = {}
    for name, spec in shapes.items():
        generate_demo(tmp_path / name, spec)
        store = RawStore(root=str(tmp_path / name))
        items, users = store.inspect_items(), store.inspect_users()
        days = [store.inspect_impressions(d) for d in DAYS[: spec.days]]
        assert items.violations == [] and users.violations == [] and all(d.violations == [] for d in days)
        reads[name] = (items.frame, users.frame, pl.concat(d.frame for d in days))

    items, users, impressions = reads["text"]
    assert "image" not in items.columns and items["title"].null_count() == 0
    assert "base_pctr" not in impressions.columns
    assert users.columns == ["user_id", "age", "region_code", "device_code"]
    assert all(dtype == pl.Int64 for dtype in users.dtypes) and 18 <= users["age"].min() <= users["age"].max() < 68

    items, users, impressions = reads["image"]
    assert items["title"].null_count() == items.height and items["image"].null_count() == 0
    assert users.columns == ["user_id", "age_band", "region", "device"]
    # A higher click intercept raises the CTR well above the default's 3-10%; lower activity
    # leaves fewer impressions per user and day.
    assert impressions["clicked"].mean() > 0.2
    text_rows = reads["text"][2]
    assert impressions.height < 0.6 * text_rows.height
