"""Demo raw data with planted structure (DESIGN.md, "Demo data").

The world: latent topics grouped into topic groups. An item's content (image and title) shows its
topic; who clicks it depends on its topic group, so items of different topics in one group are
co-clicked although they look different (the paper's Harry Potter book and toy). Users prefer one
group, sometimes two. Exposure is long-tailed, new items arrive every day, and `base_pctr` (the main
scenario's score) knows user propensity and item quality but not the user-group affinity, so item
content still has something to add, most for items with little history.

Everything comes from one seeded generator and is written with fixed settings: the same spec gives
the same bytes.
"""

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

UTC = dt.timezone.utc
SECONDS_PER_DAY = 86_400
SHAPES = ("disc", "square", "stripes", "triangle")
FILLER_WORDS = ("new", "classic", "deluxe", "mini", "set", "edition", "pro", "original", "limited", "plus")
SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "zo", "vi", "sha", "po", "nel", "dra", "qui", "bo", "fe", "gar", "ix")
BRANDS = tuple(f"brand-{i:02d}" for i in range(40))

# Click model (logits): most clicks come from the user's preferred topic groups.
CLICK_BIAS = -4.3
PREFERRED_GROUP_LIFT = 2.2
SECOND_GROUP_AFFINITY = 0.7  # affinity to a second preferred group, relative to the first
TARGETED_SHARE = 0.5  # share of impressions the main scenario already aims at a preferred group


@dataclass(frozen=True)
class DemoSpec:
    """Size and shape of the demo world.

    The defaults (2000 users, 3000 items, 22 days) give about 0.25 million impressions, enough for
    the default 21-day training window plus one evaluation day, and small enough for the whole chain
    to run in minutes on 2 CPU cores. `scale` multiplies users and items, and with them the
    impressions: `scale=40` gives about 10^7 impressions.
    """

    start_date: dt.date = dt.date(2025, 7, 1)
    days: int = 22
    users: int = 2000
    items: int = 3000
    seed: int = 0
    scale: float = 1.0
    topics: int = 24
    topic_groups: int = 6
    impressions_per_active_day: float = 8.0
    image_size: int = 32

    def __post_init__(self) -> None:
        for name in ("days", "users", "items", "topics", "topic_groups", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.days < 2:
            raise ValueError(f"DemoSpec.days must be >= 2 (a training day and an evaluation day), got {self.days}")
        if self.scale <= 0 or self.impressions_per_active_day <= 0:
            raise ValueError("DemoSpec.scale and impressions_per_active_day must be > 0")
        if self.topics % self.topic_groups:
            raise ValueError(f"topics ({self.topics}) must split evenly into topic_groups ({self.topic_groups})")

    @property
    def n_users(self) -> int:
        return max(1, round(self.users * self.scale))

    @property
    def n_items(self) -> int:
        return max(self.topics, round(self.items * self.scale))

    @property
    def last_date(self) -> dt.date:
        return self.start_date + dt.timedelta(days=self.days - 1)


@dataclass(frozen=True)
class DemoSummary:
    path: str
    first_day: dt.date
    last_day: dt.date
    users: int
    items: int
    impressions: int
    clicks: int

    def __str__(self) -> str:
        ctr = self.clicks / max(self.impressions, 1)
        return (
            f"demo data in {self.path}: {self.first_day} .. {self.last_day}, {self.users} users, "
            f"{self.items} items, {self.impressions} impressions, {self.clicks} clicks (CTR {ctr:.3f})"
        )


@dataclass(frozen=True)
class _World:
    """The planted ground truth and the latent parameters the impressions are drawn from."""

    item_ids: np.ndarray
    item_topic: np.ndarray
    item_group: np.ndarray
    item_created_day: np.ndarray  # day index; negative = in the catalog before start_date
    item_weight: np.ndarray  # long-tailed exposure weight
    item_quality: np.ndarray  # logit offset
    user_ids: np.ndarray
    user_affinity: np.ndarray  # users x groups, in [0, 1]
    user_bias: np.ndarray  # logit offset
    user_activity: np.ndarray  # expected impressions on an active day
    topic_group: np.ndarray


def generate_demo(out: str | Path, spec: DemoSpec = DemoSpec()) -> DemoSummary:
    """Write the raw contract (impressions, items, users) and the ground truth under `out`."""
    out = Path(out)
    rng = np.random.default_rng(spec.seed)
    world = _draw_world(spec, rng)
    _write(out / "items" / "part-0.parquet", _catalog(spec, world, rng))
    _write(out / "users" / "part-0.parquet", _profiles(world, rng))
    _write(out / "ground_truth" / "items.parquet", _item_truth(world))
    _write(out / "ground_truth" / "users.parquet", _user_truth(world))
    impressions = clicks = 0
    for day in range(spec.days):
        table = _impressions_of_day(spec, world, day, rng)
        date = spec.start_date + dt.timedelta(days=day)
        _write(out / "impressions" / f"date={date.isoformat()}" / "part-0.parquet", table)
        impressions += table.num_rows
        clicks += int(np.sum(table["clicked"].to_numpy()))
    return DemoSummary(str(out), spec.start_date, spec.last_date, spec.n_users, spec.n_items, impressions, clicks)


def _draw_world(spec: DemoSpec, rng: np.random.Generator) -> _World:
    n_items, n_users, groups = spec.n_items, spec.n_users, spec.topic_groups
    topic_group = np.arange(spec.topics) // (spec.topics // groups)
    item_topic = rng.integers(0, spec.topics, n_items)

    # 40% of the catalog exists before the first day; the rest arrives spread over the days.
    preexisting = rng.random(n_items) < 0.4
    created_day = np.where(preexisting, -rng.integers(1, 60, n_items), rng.integers(0, spec.days, n_items))

    # Zipf-like exposure over a random popularity order: most items get few page views.
    popularity_rank = rng.permutation(n_items) + 1
    weight = popularity_rank ** -1.1

    dominant = rng.integers(0, groups, n_users)
    second = np.where(rng.random(n_users) < 0.3, (dominant + rng.integers(1, groups, n_users)) % groups, -1)
    affinity = np.zeros((n_users, groups))
    affinity[np.arange(n_users), dominant] = 1.0
    has_second = second >= 0
    affinity[np.flatnonzero(has_second), second[has_second]] = SECOND_GROUP_AFFINITY

    return _World(
        item_ids=1_000_000 + np.arange(n_items, dtype=np.int64),
        item_topic=item_topic,
        item_group=topic_group[item_topic],
        item_created_day=created_day,
        item_weight=weight,
        item_quality=rng.normal(0.0, 0.5, n_items),
        user_ids=1 + np.arange(n_users, dtype=np.int64),
        user_affinity=affinity,
        user_bias=rng.normal(0.0, 0.4, n_users),
        user_activity=spec.impressions_per_active_day * rng.lognormal(-0.18, 0.6, n_users),
        topic_group=topic_group,
    )


def _impressions_of_day(spec: DemoSpec, world: _World, day: int, rng: np.random.Generator) -> pa.Table:
    n_users = len(world.user_ids)
    active = rng.random(n_users) < 0.7
    counts = np.where(active, rng.poisson(world.user_activity), 0)
    user = np.repeat(np.arange(n_users), counts)
    n = len(user)

    # Exposure: items available today, weighted long-tailed; items in their first two days get a
    # boost so that cold items are seen at all. Part of the traffic targets a preferred group.
    available = world.item_created_day <= day
    age = day - world.item_created_day
    weight = np.where(available, world.item_weight * np.where(age < 2, 30.0, 1.0), 0.0)
    item = _sample(rng, weight, n)
    targeted = rng.random(n) < TARGETED_SHARE
    target_group = np.argmax(world.user_affinity[user] + rng.random((n, spec.topic_groups)) * 0.5, axis=1)
    for group in range(spec.topic_groups):
        in_group = np.where(world.item_group == group, weight, 0.0)
        if in_group.sum() > 0:
            rows = np.flatnonzero(targeted & (target_group == group))
            item[rows] = _sample(rng, in_group, len(rows))

    affinity = world.user_affinity[user, world.item_group[item]]
    propensity = CLICK_BIAS + world.item_quality[item] + world.user_bias[user]
    noise = rng.normal(0.0, 0.3, n)
    clicked = rng.random(n) < _sigmoid(propensity + PREFERRED_GROUP_LIFT * affinity + noise)
    # The main scenario's score: right about users and items, blind to user-group affinity.
    base_pctr = _sigmoid(propensity + PREFERRED_GROUP_LIFT * 0.55 + rng.normal(0.0, 0.3, n))

    # Sessions: one or two per active user-day; a session's impressions fall within 30 minutes.
    session_of_row = (rng.random(n) < 0.3).astype(np.int64)
    session_start = rng.integers(0, SECONDS_PER_DAY - 1800, (n_users, 2))
    offset_us = session_start[user, session_of_row] * 1_000_000 + rng.integers(0, 1800 * 1_000_000, n)
    day_start_us = _epoch_us(spec.start_date + dt.timedelta(days=day))
    request_id = (day * n_users + user) * 2 + session_of_row

    order = np.lexsort((world.item_ids[item], world.user_ids[user], offset_us))
    table = pa.table(
        {
            "user_id": pa.array(world.user_ids[user][order], pa.int64()),
            "item_id": pa.array(world.item_ids[item][order], pa.int64()),
            "ts": pa.array(day_start_us + offset_us[order], pa.timestamp("us", tz="UTC")),
            "clicked": pa.array(clicked[order].astype(np.int8), pa.int8()),
            "base_pctr": pa.array(base_pctr[order].astype(np.float32), pa.float32()),
            "request_id": pa.array(request_id[order], pa.int64()),
        }
    )
    return _drop_repeated_keys(table)


def _drop_repeated_keys(table: pa.Table) -> pa.Table:
    """Keep the first of rows sharing (user_id, item_id, ts); astronomically rare at microseconds."""
    keys = np.stack([table[c].to_numpy().astype(np.int64) for c in ("user_id", "item_id")] + [table["ts"].cast(pa.int64()).to_numpy()])
    _, first = np.unique(keys, axis=1, return_index=True)
    return table.take(np.sort(first)) if len(first) < table.num_rows else table


def _catalog(spec: DemoSpec, world: _World, rng: np.random.Generator) -> pa.Table:
    vocabulary = [_topic_words(rng) for _ in range(spec.topics)]
    titles, images = [], []
    has_image = rng.random(len(world.item_ids)) >= 0.05
    has_title = rng.random(len(world.item_ids)) >= 0.02
    for i, topic in enumerate(world.item_topic):
        words = list(rng.choice(vocabulary[topic], size=2, replace=False)) + [str(rng.choice(FILLER_WORDS))]
        rng.shuffle(words)
        titles.append(" ".join(words) if has_title[i] else None)
        images.append(_draw_image(int(topic), spec, rng) if has_image[i] else None)
    created_us = [_epoch_us(spec.start_date + dt.timedelta(days=int(d))) for d in world.item_created_day]
    return pa.table(
        {
            "item_id": pa.array(world.item_ids, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "image": pa.array(images, pa.binary()),
            "created_at": pa.array(created_us, pa.timestamp("us", tz="UTC")),
            "brand": pa.array(rng.choice(BRANDS, len(world.item_ids)), pa.string()),
        }
    )


def _topic_words(rng: np.random.Generator) -> list[str]:
    """Eight made-up words; topics draw theirs independently, so they rarely share one."""
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))) for _ in range(8)]


def _draw_image(topic: int, spec: DemoSpec, rng: np.random.Generator) -> bytes:
    """A small PNG: the topic fixes the shape and the palette; position, size and noise vary."""
    size = spec.image_size
    hue = topic / spec.topics
    color = _hsv_to_rgb(hue + rng.normal(0, 0.01), 0.8, 0.9)
    background = _hsv_to_rgb(hue + 0.5, 0.25, 0.35)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    shape = SHAPES[topic % len(SHAPES)]
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        period = int(rng.integers(4, 8))
        for x in range(int(rng.integers(0, period)), size, period):
            draw.rectangle((x, 0, x + period // 2 - 1, size), fill=color)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    h = (h % 1.0) * 6
    i, f = int(h), h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
    return tuple(int(round(255 * c)) for c in rgb)


def _profiles(world: _World, rng: np.random.Generator) -> pa.Table:
    """Categorical profile columns; `region` leans towards the user's preferred group."""
    n = len(world.user_ids)
    dominant = np.argmax(world.user_affinity, axis=1)
    region = np.where(rng.random(n) < 0.4, dominant, rng.integers(0, 8, n))
    return pa.table(
        {
            "user_id": pa.array(world.user_ids, pa.int64()),
            "age_band": pa.array(rng.choice(["18-24", "25-34", "35-44", "45-54", "55+"], n), pa.string()),
            "region": pa.array([f"region-{r}" for r in region], pa.string()),
            "device": pa.array(rng.choice(["ios", "android", "web"], n), pa.string()),
        }
    )


def _item_truth(world: _World) -> pa.Table:
    return pa.table(
        {
            "item_id": pa.array(world.item_ids, pa.int64()),
            "topic": pa.array(world.item_topic, pa.int32()),
            "topic_group": pa.array(world.item_group, pa.int32()),
            "created_day": pa.array(world.item_created_day, pa.int32()),
        }
    )


def _user_truth(world: _World) -> pa.Table:
    ranked = np.argsort(-world.user_affinity, axis=1, kind="stable")
    second_affinity = world.user_affinity[np.arange(len(world.user_ids)), ranked[:, 1]]
    return pa.table(
        {
            "user_id": pa.array(world.user_ids, pa.int64()),
            "preferred_group": pa.array(ranked[:, 0], pa.int32()),
            "second_group": pa.array(ranked[:, 1], pa.int32(), mask=second_affinity == 0),
        }
    )


def _sample(rng: np.random.Generator, weight: np.ndarray, size: int) -> np.ndarray:
    """`size` indices drawn with probability proportional to `weight` (inverse CDF)."""
    cumulative = np.cumsum(weight)
    return np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right").clip(0, len(weight) - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _epoch_us(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1_000_000


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", compression_level=3, write_statistics=True)
