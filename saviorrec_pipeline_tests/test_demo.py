"""The demo generator: deterministic, inside the raw contract, with its planted structure present."""

import datetime as dt
import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.resources.raw import RawStore

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=6, users=400, items=500, seed=7)
DAYS = [SPEC.start_date + dt.timedelta(days=i) for i in range(SPEC.days)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    generate_demo(out, SPEC)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _impressions(demo: Path) -> pl.DataFrame:
    frame = pl.concat(RawStore(root=str(demo)).read_impressions(day) for day in DAYS)
    truth = pl.read_parquet(demo / "ground_truth" / "items.parquet")
    users = pl.read_parquet(demo / "ground_truth" / "users.parquet")
    return frame.join(truth, on="item_id").join(users, on="user_id")


def test_same_seed_same_bytes_other_seed_other_data(demo, tmp_path):
    again = generate_demo(tmp_path / "again", SPEC)
    assert _files(tmp_path / "again") == _files(demo)
    assert again.impressions == sum(pl.read_parquet(f).height for f in (demo / "impressions").rglob("*.parquet"))
    generate_demo(tmp_path / "other", DemoSpec(**{**SPEC.__dict__, "seed": 8}))
    other = _files(tmp_path / "other")
    assert other.keys() == _files(demo).keys()
    assert other["items/part-0.parquet"] != _files(demo)["items/part-0.parquet"]


def test_output_satisfies_the_raw_contract(demo):
    store = RawStore(root=str(demo))
    for day in DAYS:
        read = store.inspect_impressions(day)
        assert read.violations == [] and read.frame.height > 0
        assert read.duplicates_dropped == 0
    assert store.inspect_items().violations == []
    users = store.inspect_users()
    assert users.violations == [] and users.frame.height == SPEC.n_users


def test_clicks_follow_the_users_preferred_topic_group(demo):
    rows = _impressions(demo)
    by_match = rows.group_by(pl.col("topic_group") == pl.col("preferred_group")).agg(pl.col("clicked").mean())
    ctr = dict(zip(by_match[:, 0].to_list(), by_match[:, 1].to_list()))
    assert ctr[True] > 3 * ctr[False]
    assert 0.02 < rows["clicked"].mean() < 0.15


def test_base_pctr_is_blind_to_group_affinity(demo):
    rows = _impressions(demo)
    matched = rows.with_columns(match=pl.col("topic_group") == pl.col("preferred_group"))
    means = matched.group_by("match").agg(pl.col("base_pctr").mean(), pl.col("clicked").mean())
    base = dict(zip(means["match"], means["base_pctr"]))
    assert base[True] == pytest.approx(base[False], rel=0.25)  # while actual CTRs differ several-fold


def test_exposure_is_long_tailed(demo):
    pv = _impressions(demo).group_by("item_id").len()["len"].sort(descending=True)
    top_decile_share = pv.head(max(1, pv.len() // 10)).sum() / pv.sum()
    assert top_decile_share > 0.5
    assert pv.median() < 0.5 * pv.mean()


def test_new_items_arrive_every_day_and_are_never_shown_before_creation(demo):
    items = pl.read_parquet(demo / "items" / "part-0.parquet")
    rows = _impressions(demo).join(items.select("item_id", "created_at"), on="item_id")
    assert rows.filter(pl.col("ts") < pl.col("created_at")).is_empty()
    created_days = set(items["created_at"].dt.date().to_list())
    assert set(DAYS[1:]) <= created_days
    first_shown = rows.group_by("item_id").agg(pl.col("ts").min().dt.date().alias("day"))["day"]
    assert first_shown.filter(first_shown > DAYS[0]).len() > 0


def test_images_and_titles_reflect_the_topic(demo):
    items = pl.read_parquet(demo / "items" / "part-0.parquet").join(
        pl.read_parquet(demo / "ground_truth" / "items.parquet"), on="item_id"
    )
    assert 0 < items["image"].null_count() < items.height // 5
    assert 0 < items["title"].null_count() < items.height // 10

    with_image = items.filter(pl.col("image").is_not_null())
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in with_image["image"]])
    assert pixels.shape[1:] == (SPEC.image_size, SPEC.image_size, 3)
    features = pixels.reshape(len(pixels), -1)
    topic = with_image["topic"].to_numpy()
    centroids = np.stack([features[topic == t].mean(axis=0) for t in np.unique(topic)])
    nearest = np.unique(topic)[np.argmin(((features[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert (nearest == topic).mean() > 0.8  # an image is closest to its own topic's mean image

    titled = items.filter(pl.col("title").is_not_null())
    words = titled.select("topic", pl.col("title").str.split(" ").alias("word")).explode("word")
    topics_per_word = words.group_by("word").agg(pl.col("topic").n_unique())["topic"]
    share_of_words_with_one_topic = (topics_per_word == 1).mean()
    assert share_of_words_with_one_topic > 0.8


def test_invalid_spec_is_refused():
    with pytest.raises(ValueError, match="days must be >= 2"):
        DemoSpec(days=1)
    with pytest.raises(ValueError, match="split evenly"):
        DemoSpec(topics=10, topic_groups=4)
