"""Demo raw data with planted ground truth.

The data is built so that the method's claims can be seen on it:

* Latent topics are partitioned into topic groups (the paper's Harry Potter example: the book and
  the wand are different content, yet the same users click both). An item's content (image,
  title, category) is drawn from its TOPIC only; who clicks it depends on its topic GROUP only.
  So an untuned content encoder sees topics, while co-clicks tie the topics of a group together:
  an encoder aligned on co-clicks retrieves same-group items better than the untuned one.
* Clicks come from the user's affinity to the item's group. `base_pctr`, the main scenario's
  score, knows user propensity and item quality but not that affinity, so content adds value.
* Exposure is long-tailed (Zipf-like) and new items arrive every day, so most items have low PV:
  an ID-only model cannot learn them, content can. That is where SaviorRec should win most.

The ground truth is written beside the contract folders, in `ground_truth/`, for tests and
evaluation; the pipeline never reads it.

Everything derives from `numpy.random.default_rng` children of `spec.seed`, each part of the
output from its own child, and files are written with fixed encoder and Parquet settings, so the
same spec gives byte-identical files. Impressions are generated and written one day at a time,
so memory stays bounded by one day's rows and the item catalog's latent arrays.
"""

import colorsys
import datetime as dt
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

DAY_US = 86_400_000_000
UTC_US = pa.timestamp("us", tz="UTC")
_EPOCH = dt.date(1970, 1, 1)

# Click model: logit = CLICK_BIAS + AFFINITY_WEIGHT * affinity(user, item group)
#                      + item quality + user propensity + noise.
# With these, impressions of a preferred group are clicked ~17%, others ~2%: overall ~8%.
CLICK_BIAS = -5.0
AFFINITY_WEIGHT = 2.8
CLICK_NOISE = 0.3
BASE_PCTR_NOISE = 0.3  # `base_pctr` is a noisy estimate, not the truth
QUALITY_SD = 0.5
PROPENSITY_SD = 0.4
SECOND_GROUP_RATE = 0.3  # users with a second preferred group
SECOND_GROUP_AFFINITY = 0.7
BACKGROUND_TASTE = 0.15  # affinity to other groups is uniform in [0, this)

# Which of three slots an impression fills: popular over the whole catalog, popular within one of
# the user's preferred groups (the main scenario's own personalisation), or a recently created item.
PERSONAL_SLOT_RATE = 0.25
FRESH_SLOT_RATE = 0.10
FRESH_WINDOW_US = 3 * DAY_US
INITIAL_CATALOG_AGE_US = 60 * DAY_US  # the starting catalog was created over the 60 days before

# Sessions: a user's impressions of a day come in a few sessions, seconds apart within one.
EXTRA_SESSIONS_MEAN = 0.8
MIN_GAP_S = 2.0
MEAN_GAP_S = 20.0
IMPRESSIONS_PER_REQUEST = 5
# 2000 gaps of MIN_GAP_S + Exp(MEAN_GAP_S) last ~12.5 h at most, so even one session fits a day.
MAX_IMPRESSIONS_PER_USER_DAY = 2000

TITLE_FILLERS = ("new", "classic", "mini", "deluxe", "set", "edition", "original", "premium", "limited", "pack")
CATEGORIES = ("books", "toys", "apparel", "home", "stationery", "games", "accessories", "posters")
WORDS_PER_TOPIC = 12
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
REGIONS = ("north", "south", "east", "west", "central", "coast", "islands", "mountains")
DEVICES = ("app", "web", "tablet")
PROFILE_SIGNAL = 0.3  # how often a profile column follows the user's preferences instead of chance

IMPRESSION_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", UTC_US),
    ("clicked", pa.int8()), ("base_pctr", pa.float32()), ("request_id", pa.int64()),
])
ITEM_CHUNK = 4096  # catalog rows drawn, encoded and written at a time
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. `scale` multiplies users and items, and with them impressions.

    Measured on 2 CPU cores: the defaults give 339,219 impressions (CTR 8.0%) in about 2 s;
    `scale=30` (60,000 users, 90,000 items) gives 9.9e6 impressions in about 45 s, at under
    300 MiB peak memory (one day and the catalog's chunk at a time).
    """

    start_date: dt.date = dt.date(2025, 7, 1)
    days: int = 22
    users: int = 2000
    items: int = 3000
    seed: int = 0
    scale: float = 1.0
    topics: int = 24
    topic_groups: int = 6  # topics are split evenly: group = topic // (topics / topic_groups)
    impressions_per_active_day: float = 15.0  # mean over active user-days
    initial_catalog_fraction: float = 0.6  # items existing at start_date; the rest arrive daily
    zipf_exponent: float = 1.1  # item exposure weight = popularity rank ** -zipf_exponent
    image_size: int = 32
    missing_image_rate: float = 0.05
    missing_title_rate: float = 0.02  # among items that have an image, so no item lacks both
    # Shapes unlike the default, all inside the raw contract:
    modalities: Literal["both", "text", "image"] = "both"  # text: no `image` column; image: every title null
    base_pctr: bool = True  # False: impressions without the optional `base_pctr` column
    profile: Literal["categorical", "numeric"] = "categorical"  # numeric: int64 profile columns
    click_bias: float = CLICK_BIAS  # the click logit's intercept: -5 gives a CTR of about 8%
    activity: float = 0.5  # mean probability that a user is active on a day

    def __post_init__(self) -> None:
        for name in ("days", "users", "items", "topics", "topic_groups", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.days < 2:
            raise ValueError(f"days must be >= 2 (a training day and an evaluation day), got {self.days}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"scale {self.scale} leaves no users or no items")
        if self.topics % self.topic_groups:
            raise ValueError(f"topics ({self.topics}) must split evenly into topic_groups ({self.topic_groups})")
        if self.impressions_per_active_day < 1:
            raise ValueError(f"impressions_per_active_day must be >= 1, got {self.impressions_per_active_day}")
        if not 0 < self.activity <= 0.5:
            raise ValueError(f"activity must be in (0, 0.5], got {self.activity}")
        if not 0 < self.initial_catalog_fraction <= 1:
            raise ValueError(f"initial_catalog_fraction must be in (0, 1], got {self.initial_catalog_fraction}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        for name in ("missing_image_rate", "missing_title_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name, allowed in (("modalities", ("both", "text", "image")), ("profile", ("categorical", "numeric"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def n_users(self) -> int:
        return round(self.users * self.scale)

    @property
    def n_items(self) -> int:
        return round(self.items * self.scale)

    @property
    def topics_per_group(self) -> int:
        return self.topics // self.topic_groups

    @property
    def last_day(self) -> dt.date:
        return self.start_date + dt.timedelta(days=self.days - 1)


@dataclass(frozen=True)
class DemoSummary:
    path: str
    users: int
    items: int
    impressions: int
    clicks: int
    days: int
    first_day: dt.date
    last_day: dt.date
    seconds: float

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    def __str__(self) -> str:
        return (
            f"demo data in {self.path}: {self.users:,} users, {self.items:,} items, "
            f"{self.impressions:,} impressions with {self.clicks:,} clicks (CTR {self.ctr:.1%}) "
            f"over {self.days} days {self.first_day}..{self.last_day}, in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class _World:
    """The latent truth. Arrays are indexed by item index (item_id - 1, in creation order) and
    user index (user_id - 1)."""

    item_topic: np.ndarray
    item_group: np.ndarray
    item_quality: np.ndarray
    item_weight: np.ndarray  # exposure weight, Zipf-like over a quality-correlated rank
    item_created_us: np.ndarray  # sorted ascending, so the items existing at t are a prefix
    user_first_group: np.ndarray
    user_second_group: np.ndarray  # -1 where the user has one preferred group only
    user_affinity: np.ndarray  # users x groups, in [0, 1]
    user_propensity: np.ndarray
    user_activity: np.ndarray  # probability of being active on a day
    user_heaviness: np.ndarray  # multiplies impressions per active day, mean 1


def generate_demo(out: str | Path, spec: DemoSpec) -> DemoSummary:
    """Write the demo raw data into the local directory `out`, which must not exist or be empty.

    The data is built in a temporary sibling directory and moved into place at the end, so a
    failed or interrupted run never leaves a partial dataset that looks complete.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new or empty one")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    if building.exists():
        shutil.rmtree(building)
    try:
        world_seed, users_seed, items_seed, *day_seeds = np.random.SeedSequence(spec.seed).spawn(3 + spec.days)
        world = _make_world(spec, np.random.default_rng(world_seed))
        _write_users(building / "users" / "part-0.parquet", spec, world, np.random.default_rng(users_seed))
        _write_items(building / "items" / "part-0.parquet", spec, world, np.random.default_rng(items_seed))
        _write_ground_truth(building / "ground_truth", world)
        impressions = clicks = 0
        for day_index, day_seed in enumerate(day_seeds):
            day = spec.start_date + dt.timedelta(days=day_index)
            table = _day_impressions(day, spec, world, np.random.default_rng(day_seed))
            _write_table(table, building / "impressions" / f"date={day.isoformat()}" / "part-0.parquet")
            impressions += table.num_rows
            clicks += int(table["clicked"].to_numpy().sum())
        if out.exists():
            out.rmdir()
        building.rename(out)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return DemoSummary(
        path=str(out), users=spec.n_users, items=spec.n_items, impressions=impressions, clicks=clicks,
        days=spec.days, first_day=spec.start_date, last_day=spec.last_day, seconds=time.perf_counter() - started,
    )


def _make_world(spec: DemoSpec, rng: np.random.Generator) -> _World:
    n_items, n_users, groups = spec.n_items, spec.n_users, spec.topic_groups
    start_us = _day_start_us(spec.start_date)

    n_initial = max(1, round(n_items * spec.initial_catalog_fraction))
    created = np.concatenate([
        start_us - rng.integers(1, INITIAL_CATALOG_AGE_US, n_initial),
        start_us + rng.integers(0, spec.days * DAY_US, n_items - n_initial),
    ])
    created.sort()
    topic = rng.integers(0, spec.topics, n_items)
    quality = rng.normal(0.0, QUALITY_SD, n_items)
    # Popular items tend to be good ones, but not strictly: rank on quality plus noise.
    rank = np.empty(n_items, dtype=np.int64)
    rank[np.argsort(-(quality + rng.normal(0.0, 1.0, n_items)), kind="stable")] = np.arange(1, n_items + 1)
    weight = rank.astype(np.float64) ** -spec.zipf_exponent

    first = rng.integers(0, groups, n_users)
    has_second = (rng.random(n_users) < SECOND_GROUP_RATE) & (groups > 1)
    second = np.where(has_second, (first + 1 + rng.integers(0, max(groups - 1, 1), n_users)) % groups, -1)
    affinity = rng.uniform(0.0, BACKGROUND_TASTE, (n_users, groups))
    rows = np.arange(n_users)
    affinity[rows[has_second], second[has_second]] = SECOND_GROUP_AFFINITY
    affinity[rows, first] = 1.0
    heaviness = rng.lognormal(0.0, 0.5, n_users)
    return _World(
        item_topic=topic,
        item_group=topic // spec.topics_per_group,
        item_quality=quality,
        item_weight=weight,
        item_created_us=created,
        user_first_group=first,
        user_second_group=second,
        user_affinity=affinity,
        user_propensity=rng.normal(0.0, PROPENSITY_SD, n_users),
        user_activity=rng.beta(2.0, 2.0, n_users) * (spec.activity / 0.5),
        user_heaviness=heaviness / heaviness.mean(),
    )


def _day_start_us(day: dt.date) -> int:
    return (day - _EPOCH).days * DAY_US


# ---------------------------------------------------------------------------------------------
# Users and ground truth


def _write_users(path: Path, spec: DemoSpec, world: _World, rng: np.random.Generator) -> None:
    """Profile columns weakly tied to preferences: age band and region follow the preferred
    groups for PROFILE_SIGNAL of users, the device follows click propensity. A numeric profile
    holds the same information as int64 columns: an age in years within the band, a two-digit
    region code and a device code."""
    n = len(world.user_first_group)
    follows = rng.random((2, n)) < PROFILE_SIGNAL
    age = np.where(follows[0], world.user_first_group % len(AGE_BANDS), rng.integers(0, len(AGE_BANDS), n))
    second_or_first = np.where(world.user_second_group >= 0, world.user_second_group, world.user_first_group)
    region = np.where(follows[1], second_or_first % len(REGIONS), rng.integers(0, len(REGIONS), n))
    app_share = _sigmoid(world.user_propensity / PROPENSITY_SD)
    device = np.where(rng.random(n) < app_share, 0, rng.integers(1, len(DEVICES), n))
    if spec.profile == "numeric":
        columns = {
            "age": pa.array(18 + 10 * age + rng.integers(0, 10, n), pa.int64()),
            "region_code": pa.array(10 * region + rng.integers(0, 10, n), pa.int64()),
            "device_code": pa.array(device, pa.int64()),
        }
    else:
        columns = {
            "age_band": pa.array(np.asarray(AGE_BANDS)[age], pa.string()),
            "region": pa.array(np.asarray(REGIONS)[region], pa.string()),
            "device": pa.array(np.asarray(DEVICES)[device], pa.string()),
        }
    _write_table(pa.table({"user_id": pa.array(np.arange(1, n + 1), pa.int64()), **columns}), path)


def _write_ground_truth(folder: Path, world: _World) -> None:
    n_items, n_users = len(world.item_topic), len(world.user_first_group)
    _write_table(
        pa.table({
            "item_id": pa.array(np.arange(1, n_items + 1), pa.int64()),
            "topic": pa.array(world.item_topic, pa.int32()),
            "topic_group": pa.array(world.item_group, pa.int32()),
        }),
        folder / "items.parquet",
    )
    second = world.user_second_group
    _write_table(
        pa.table({
            "user_id": pa.array(np.arange(1, n_users + 1), pa.int64()),
            "preferred_group": pa.array(world.user_first_group, pa.int32()),
            "second_group": pa.array(second, pa.int32(), mask=second < 0),
        }),
        folder / "users.parquet",
    )


# ---------------------------------------------------------------------------------------------
# Items: titles, images, categories from the topic


def _write_items(path: Path, spec: DemoSpec, world: _World, rng: np.random.Generator) -> None:
    """The catalog in chunks of ITEM_CHUNK rows (one row group each), so memory stays bounded."""
    vocabulary = _topic_vocabulary(spec.topics, rng)
    palettes = _topic_palettes(spec.topics)
    # A topic's category is its position within its group: like the Harry Potter book and toy,
    # the topics of one group are of different categories, and a category spans all groups.
    categories = np.asarray([CATEGORIES[t % spec.topics_per_group % len(CATEGORIES)] for t in range(spec.topics)])
    schema = pa.schema([
        ("item_id", pa.int64()), ("title", pa.string()), ("image", pa.binary()),
        ("created_at", UTC_US), ("category", pa.string()),
    ])
    if spec.modalities == "text":
        schema = schema.remove(schema.get_field_index("image"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as writer:
        for lo in range(0, spec.n_items, ITEM_CHUNK):
            hi = min(lo + ITEM_CHUNK, spec.n_items)
            topic = world.item_topic[lo:hi]
            no_image = rng.random(hi - lo) < spec.missing_image_rate
            no_title = ~no_image & (rng.random(hi - lo) < spec.missing_title_rate)
            if spec.modalities == "text":
                no_title[:] = False
            elif spec.modalities == "image":
                no_image[:], no_title[:] = False, True
            titles = _titles(topic, vocabulary, rng)
            images = _images(topic, palettes, spec.image_size, rng) if spec.modalities != "text" else [None] * (hi - lo)
            columns = {
                "item_id": pa.array(np.arange(lo + 1, hi + 1), pa.int64()),
                "title": pa.array([None if skip else t for t, skip in zip(titles, no_title)], pa.string()),
                "image": pa.array([None if skip else png for png, skip in zip(images, no_image)], pa.binary()),
                "created_at": pa.array(world.item_created_us[lo:hi], UTC_US),
                "category": pa.array(categories[topic], pa.string()),
            }
            chunk = pa.table({name: columns[name] for name in schema.names}, schema=schema)
            writer.write_table(chunk, row_group_size=ITEM_CHUNK)


def _topic_vocabulary(topics: int, rng: np.random.Generator) -> list[list[str]]:
    """WORDS_PER_TOPIC made-up words per topic, all distinct and distinct from the fillers."""
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    seen = set(TITLE_FILLERS)
    vocabulary = []
    for _ in range(topics):
        words: list[str] = []
        while len(words) < WORDS_PER_TOPIC:
            syllables = rng.integers(0, [len(consonants), len(vowels)], (rng.integers(2, 4), 2))
            word = "".join(consonants[c] + vowels[v] for c, v in syllables)
            if word not in seen:
                seen.add(word)
                words.append(word)
        vocabulary.append(words)
    return vocabulary


def _titles(topic: np.ndarray, vocabulary: list[list[str]], rng: np.random.Generator) -> list[str]:
    """2-4 words of the item's topic and 0-2 shared fillers, in random order."""
    n = len(topic)
    topic_picks = np.argsort(rng.random((n, WORDS_PER_TOPIC)), axis=1)[:, :4]
    filler_picks = np.argsort(rng.random((n, len(TITLE_FILLERS))), axis=1)[:, :2]
    n_topic_words = rng.integers(2, 5, n)
    n_fillers = rng.integers(0, 3, n)
    order = np.argsort(rng.random((n, 6)), axis=1)
    titles = []
    for i in range(n):
        words = [vocabulary[topic[i]][k] for k in topic_picks[i, : n_topic_words[i]]]
        words += [TITLE_FILLERS[k] for k in filler_picks[i, : n_fillers[i]]]
        shuffled = [words[k] for k in order[i] if k < len(words)]
        titles.append(" ".join(shuffled).capitalize())
    return titles


# A shape drawer gets the canvas, its size, the centre, a radius, a phase in [0, 1) for patterns,
# and the foreground colour.
RGB = tuple[int, int, int]
Drawer = Callable[[ImageDraw.ImageDraw, int, float, float, float, float, RGB], None]


def _disc(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)


def _square(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    h = 0.85 * r
    d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fg)


def _triangle(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)


def _ring(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, s // 10))


def _cross(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    w = r / 3
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)


def _horizontal_stripes(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    period = max(4.0, r / 2)
    for y in np.arange(phase * period - period, s, period):
        d.rectangle([0, y, s, y + period / 2], fill=fg)


def _vertical_stripes(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    period = max(4.0, r / 2)
    for x in np.arange(phase * period - period, s, period):
        d.rectangle([x, 0, x + period / 2, s], fill=fg)


def _diagonal_stripes(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    period = max(5.0, r / 1.5)
    for k in np.arange(phase * period - s, 2 * s, period):
        d.line([(k, 0), (k + s, s)], fill=fg, width=max(2, s // 12))


def _checker(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    cell = max(3.0, r / 2)
    offset = phase * cell
    for i, y in enumerate(np.arange(offset - cell, s, cell)):
        for j, x in enumerate(np.arange(offset - cell, s, cell)):
            if (i + j) % 2:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)


def _dots(d: ImageDraw.ImageDraw, s: int, cx: float, cy: float, r: float, phase: float, fg: RGB) -> None:
    step = max(5.0, 0.7 * r)
    dot = step / 4
    for y in np.arange(phase * step, s, step):
        for x in np.arange(phase * step, s, step):
            d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)


# Topic t draws SHAPES[t % len(SHAPES)]: the topics of one group (consecutive) look different.
SHAPES: tuple[Drawer, ...] = (
    _disc, _horizontal_stripes, _square, _vertical_stripes, _triangle,
    _checker, _ring, _diagonal_stripes, _cross, _dots,
)


def _topic_palettes(topics: int) -> np.ndarray:
    """(topics, 2, 3) background and foreground RGB: hues spread by the golden ratio, so
    neighbouring topics (same group) differ in colour as well as in shape."""
    palettes = np.empty((topics, 2, 3))
    for t in range(topics):
        hue = (t * 0.618033988749895) % 1.0
        light = 0.35 + 0.5 * ((t * 0.381966) % 1.0)
        palettes[t, 0] = colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.35, light)
        palettes[t, 1] = colorsys.hsv_to_rgb(hue, 0.9, 1.25 - light * 0.6)
    return np.clip(palettes * 255, 0, 255)


def _images(topic: np.ndarray, palettes: np.ndarray, size: int, rng: np.random.Generator) -> list[bytes]:
    """PNGs of the topic's shape and palette, with per-item position, size, colour and pixel noise."""
    n = len(topic)
    centre = size / 2 + rng.uniform(-0.15, 0.15, (n, 2)) * size
    radius = size * 0.3 * rng.uniform(0.7, 1.3, n)
    phase = rng.random(n)
    colours = np.clip(palettes[topic] + rng.normal(0.0, 12.0, (n, 2, 3)), 0, 255).astype(np.uint8)
    noise = rng.normal(0.0, 8.0, (n, size, size, 3))
    images = []
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in colours[i, 0]))
        fg = tuple(int(c) for c in colours[i, 1])
        SHAPES[topic[i] % len(SHAPES)](ImageDraw.Draw(image), size, centre[i, 0], centre[i, 1], radius[i], phase[i], fg)
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise[i], 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=6, optimize=False)
        images.append(buffer.getvalue())
    return images


# ---------------------------------------------------------------------------------------------
# Impressions, one day at a time


def _day_impressions(day: dt.date, spec: DemoSpec, world: _World, rng: np.random.Generator) -> pa.Table:
    users, ts, request_id = _sessions(day, spec, world, rng)
    schema = IMPRESSION_SCHEMA if spec.base_pctr else IMPRESSION_SCHEMA.remove(IMPRESSION_SCHEMA.get_field_index("base_pctr"))
    if not len(users):  # tiny specs can have a day on which no one is active
        return schema.empty_table()
    items = _pick_items(users, ts, world, rng)

    known = world.item_quality[items] + world.user_propensity[users]
    group_affinity = world.user_affinity[users, world.item_group[items]]
    click_p = _sigmoid(spec.click_bias + AFFINITY_WEIGHT * group_affinity + known + rng.normal(0.0, CLICK_NOISE, len(users)))
    clicked = rng.random(len(users)) < click_p
    base_logit = _calibrated(known + rng.normal(0.0, BASE_PCTR_NOISE, len(users)), click_p.mean())

    order = np.lexsort((items, users, ts))  # by ts, then user, then item
    users, items, ts = users[order], items[order], ts[order]
    # Two sessions of a user may overlap; an identical (user, item, ts) would be a duplicate.
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = (ts[1:] != ts[:-1]) | (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    columns = {
        "user_id": users[keep] + 1,
        "item_id": items[keep] + 1,
        "ts": ts[keep],
        "clicked": clicked[order][keep],
        "base_pctr": _sigmoid(base_logit[order][keep]),
        "request_id": request_id[order][keep],
    }
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _sessions(
    day: dt.date, spec: DemoSpec, world: _World, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per impression: user index, ts (µs, on `day`) and request id.

    Each active user has a few sessions; a session's impressions are consecutive, seconds apart,
    and come in requests of IMPRESSIONS_PER_REQUEST. A request id holds the day number in its high
    32 bits and the day's request counter in the low ones: unique across days, with no state
    carried from one day to the next.
    """
    active = np.flatnonzero(rng.random(len(world.user_activity)) < world.user_activity)
    per_user = 1 + rng.poisson(world.user_heaviness[active] * (spec.impressions_per_active_day - 1))
    per_user = np.minimum(per_user, MAX_IMPRESSIONS_PER_USER_DAY)
    sessions_per_user = np.minimum(per_user, 1 + rng.poisson(EXTRA_SESSIONS_MEAN, len(active)))
    total = int(per_user.sum())

    position = np.arange(total) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # within the user's day
    local_session = position * np.repeat(sessions_per_user, per_user) // np.repeat(per_user, per_user)
    session = np.repeat(np.cumsum(sessions_per_user) - sessions_per_user, per_user) + local_session

    gaps = np.round((MIN_GAP_S + rng.exponential(MEAN_GAP_S, total)) * 1e6).astype(np.int64)
    elapsed = np.cumsum(gaps)
    first_of_session = np.ones(total, dtype=bool)
    first_of_session[1:] = session[1:] != session[:-1]
    starts = np.flatnonzero(first_of_session)
    ends = np.append(starts[1:], total)[: len(starts)] - 1  # empty when no one is active
    offset = elapsed - elapsed[starts][session]
    length = elapsed[ends] - elapsed[starts]
    session_start = (rng.random(len(starts)) * (DAY_US - length)).astype(np.int64)
    ts = _day_start_us(day) + session_start[session] + offset

    in_session = np.arange(total) - starts[session]
    new_request = in_session % IMPRESSIONS_PER_REQUEST == 0
    request_id = ((day - _EPOCH).days << 32) + np.cumsum(new_request) - 1
    return np.repeat(active, per_user), ts, request_id


def _pick_items(users: np.ndarray, ts: np.ndarray, world: _World, rng: np.random.Generator) -> np.ndarray:
    """One item index per impression, among the items created at or before its ts.

    Items are in creation order, so those existing at ts are a prefix: sampling by exposure
    weight is a search in the prefix's cumulative weights. A personal or fresh slot with nothing
    to offer (no item of the group yet, no recent item) keeps the popular pick.
    """
    n = len(users)
    slot = rng.random(n)
    u = rng.random(n)
    existing = np.searchsorted(world.item_created_us, ts, side="right")
    items = _weighted_prefix_pick(np.cumsum(world.item_weight), existing, u)

    personal = slot < PERSONAL_SLOT_RATE
    # A user with two preferred groups gets half of the personal slots from each.
    use_second = (world.user_second_group[users] >= 0) & (rng.random(n) < 0.5)
    group = np.where(use_second, world.user_second_group[users], world.user_first_group[users])
    for g in range(world.user_affinity.shape[1]):
        members = np.flatnonzero(world.item_group == g)
        rows = np.flatnonzero(personal & (group == g))
        existing_in_group = np.searchsorted(world.item_created_us[members], ts[rows], side="right")
        ok = existing_in_group > 0
        picks = _weighted_prefix_pick(np.cumsum(world.item_weight[members]), existing_in_group[ok], u[rows[ok]])
        items[rows[ok]] = members[picks]

    fresh = (slot >= PERSONAL_SLOT_RATE) & (slot < PERSONAL_SLOT_RATE + FRESH_SLOT_RATE)
    recent_from = np.searchsorted(world.item_created_us, ts - FRESH_WINDOW_US, side="right")
    recent = existing - recent_from
    rows = np.flatnonzero(fresh & (recent > 0))
    items[rows] = recent_from[rows] + (u[rows] * recent[rows]).astype(np.int64)
    return items


def _weighted_prefix_pick(cumulative: np.ndarray, prefix: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i < prefix drawn with probability weight[i] / sum(weight[:prefix]); prefix >= 1."""
    picks = np.searchsorted(cumulative, u * cumulative[prefix - 1], side="right")
    return np.minimum(picks, prefix - 1)


def _calibrated(logit: np.ndarray, mean: float) -> np.ndarray:
    """`logit` shifted so that its probabilities average `mean`, as a production score's do:
    the main scenario's score knows what the user and the item bring, not the user-group affinity."""
    shift = np.log(mean / (1 - mean))
    for _ in range(20):  # Newton steps on the shift; it converges in a few
        p = _sigmoid(logit + shift)
        shift += (mean - p.mean()) / max(float((p * (1 - p)).mean()), 1e-12)
    return logit + shift


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=1 << 20, **PARQUET_OPTIONS)
