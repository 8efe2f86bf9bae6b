"""The raw input contract as data and pure checks.

A check never raises on bad data: it returns `Violation`s, so the raw assets can show each rule
as a Dagster asset check, and readers can refuse the input with every problem named at once.
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
from dataclasses import dataclass
from typing import Callable

import polars as pl
import pyarrow as pa
from PIL import Image

TypeTest = Callable[[pa.DataType], bool]


def _is_int(t: pa.DataType) -> bool:
    # Any signed width, and unsigned widths that fit int64: all widen to int64 losslessly.
    return pa.types.is_signed_integer(t) or t in (pa.uint8(), pa.uint16(), pa.uint32())


def _is_flag(t: pa.DataType) -> bool:
    return _is_int(t) or pa.types.is_boolean(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_any(t: pa.DataType) -> bool:
    return not pa.types.is_nested(t)


@dataclass(frozen=True)
class Column:
    name: str
    expected: str  # what the error message says was expected
    test: TypeTest
    cast: pl.DataType | None  # the normalised type, None to keep as read


@dataclass(frozen=True)
class TableSpec:
    name: str
    required: tuple[Column, ...]
    optional: tuple[Column, ...]
    id_columns: tuple[str, ...]
    unique_ids: bool = False  # one row per id (catalog, profiles), not per event

    def columns(self) -> tuple[Column, ...]:
        return self.required + self.optional


UTC_TS = pl.Datetime("us", "UTC")
_TS = Column("ts", "a timestamp", pa.types.is_timestamp, UTC_TS)

IMPRESSIONS = TableSpec(
    name="impressions",
    required=(
        Column("user_id", "int64", _is_int, pl.Int64),
        Column("item_id", "int64", _is_int, pl.Int64),
        _TS,
        Column("clicked", "int8 in {0,1}", _is_flag, pl.Int8),
    ),
    optional=(
        Column("base_pctr", "float32", pa.types.is_floating, pl.Float32),
        Column("request_id", "a scalar", _is_any, None),
    ),
    id_columns=("user_id", "item_id"),
)
ITEMS = TableSpec(
    name="items",
    required=(
        Column("item_id", "int64", _is_int, pl.Int64),
        Column("title", "string", _is_string, pl.String),
    ),
    optional=(
        Column("image", "binary (encoded PNG/JPEG)", _is_binary, pl.Binary),
        Column("created_at", "a timestamp", pa.types.is_timestamp, UTC_TS),
    ),
    id_columns=("item_id",),
    unique_ids=True,
)
USERS = TableSpec(
    name="users",
    required=(Column("user_id", "int64", _is_int, pl.Int64),),
    optional=(),
    id_columns=("user_id",),
    unique_ids=True,
)
IMPRESSION_KEY = ("user_id", "item_id", "ts")

# Rules, each shown as a Dagster asset check on the raw assets.
RULE_READABLE = "readable"
RULE_SCHEMA = "schema"
RULE_NULL_IDS = "null_ids"
RULE_CLICKED_DOMAIN = "clicked_domain"
RULE_ROWS_ON_DAY = "rows_on_day"
RULE_UNIQUE_IDS = "unique_ids"
RULE_IMAGE_OR_TITLE = "image_or_title"
RULE_IMAGE_DECODABLE = "image_decodable"
IMPRESSION_RULES = (RULE_READABLE, RULE_SCHEMA, RULE_NULL_IDS, RULE_CLICKED_DOMAIN, RULE_ROWS_ON_DAY)
PROFILE_RULES = (RULE_READABLE, RULE_SCHEMA, RULE_NULL_IDS, RULE_UNIQUE_IDS)
ITEM_RULES = PROFILE_RULES + (RULE_IMAGE_OR_TITLE, RULE_IMAGE_DECODABLE)

IMAGE_FORMATS = ("PNG", "JPEG")
# Larger images are refused before their pixels are decoded: a few kilobytes of PNG can declare
# gigapixels (a decompression bomb), and the encoder shrinks every image to its tower's size anyway.
MAX_IMAGE_SIDE = 4096
UNDECODABLE = f"do not decode as {' or '.join(IMAGE_FORMATS)}"
OVERSIZED = f"are larger than {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"
# Item ids an error message lists; past this it says how many more there are.
LISTED_IDS = 50


@dataclass(frozen=True)
class Violation:
    rule: str
    file: str
    column: str | None
    problem: str

    def __str__(self) -> str:
        where = f"column '{self.column}'" if self.column else "file"
        return f"{self.file}: {where}: {self.problem}"


class RawContractError(ValueError):
    """Raw input that breaks the contract; the message names file, column and problem, and ends
    with `hint` (how to fix it) when there is one."""

    def __init__(self, violations: list[Violation], hint: str = ""):
        self.violations = violations
        lines = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"raw input breaks the contract ({len(violations)} problem(s)):\n{lines}" + (f"\n{hint}" if hint else ""))


def schema_violations(spec: TableSpec, schema: pa.Schema, file: str) -> list[Violation]:
    found = {field.name: field.type for field in schema}
    violations = [
        Violation(RULE_SCHEMA, file, c.name, f"missing required column ({spec.name} needs {c.expected})")
        for c in spec.required
        if c.name not in found
    ]
    violations += [
        Violation(RULE_SCHEMA, file, c.name, f"has type {found[c.name]}, expected {c.expected}")
        for c in spec.columns()
        if c.name in found and not c.test(found[c.name])
    ]
    return violations


def normalise(spec: TableSpec, df: pl.DataFrame) -> pl.DataFrame:
    """Cast contract columns to their canonical types.

    Integers widen to int64; naive timestamps are taken as UTC and zoned ones converted to UTC,
    so "which day" is always answered in UTC.
    """
    casts = []
    for c in spec.columns():
        if c.name not in df.columns or c.cast is None:
            continue
        col = pl.col(c.name)
        if c.cast == UTC_TS:
            if df.schema[c.name].time_zone is None:
                col = col.dt.replace_time_zone("UTC")
            col = col.dt.convert_time_zone("UTC")
        casts.append(col.cast(c.cast))
    return df.with_columns(casts)


def has_image(items: pl.DataFrame) -> pl.Expr:
    # An empty byte string is no image: the encoder has nothing to decode.
    if "image" not in items.columns:
        return pl.lit(False)
    return pl.col("image").is_not_null() & (pl.col("image").bin.size() > 0)


def has_title() -> pl.Expr:
    # A blank title is no title: the encoder masks it out like a null one.
    return pl.col("title").is_not_null() & (pl.col("title").str.strip_chars().str.len_chars() > 0)


def _example(values: pl.Series) -> str:
    return ", ".join(str(v) for v in values.head(3).to_list())


def _listed(ids: list) -> str:
    more = f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else ""
    return ", ".join(str(i) for i in ids[:LISTED_IDS]) + more


def image_problem(data: bytes) -> tuple[str, str] | None:
    """Why an encoded image cannot go to the encoder, as (UNDECODABLE or OVERSIZED, detail), or
    None when it decodes as PNG or JPEG with no side over MAX_IMAGE_SIDE. The size is read from
    the header first, so an oversized image is never decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as picture:
            width, height = picture.size
            if max(width, height) > MAX_IMAGE_SIDE:
                return OVERSIZED, f"{width}x{height}"
            picture.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own limit, far above ours
        return OVERSIZED, "a decompression bomb"
    except Exception:  # any decoder failure: not an image, another format, truncated or corrupt data
        return UNDECODABLE, ""
    return None


def image_violations(df: pl.DataFrame, file: str) -> list[Violation]:
    """One violation per kind of bad image, naming every item of that kind."""
    if "image" not in df.columns:
        return []
    found: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        # Pillow warns of a bomb below the size at which it refuses one: ours refuses it anyway,
        # naming its size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for item, data in df.filter(has_image(df)).select("item_id", "image").iter_rows():
            problem = image_problem(data)
            if problem is not None:
                kind, detail = problem
                found.setdefault(kind, []).append(f"{item} ({detail})" if detail else str(item))
    return [
        Violation(RULE_IMAGE_DECODABLE, file, "image", f"{len(items)} image(s) that {kind}: item_id {_listed(items)}")
        for kind, items in found.items()
    ]


def value_violations(spec: TableSpec, df: pl.DataFrame, file: str) -> list[Violation]:
    """Checks on normalised rows that do not depend on the partition: null ids, clicked domain,
    an image or a title for every item (an item with neither has nothing to embed), and every
    image decodable within the size limit."""
    violations = []
    for name in spec.id_columns:
        nulls = df[name].null_count()
        if nulls:
            violations.append(Violation(RULE_NULL_IDS, file, name, f"{nulls} null id(s)"))
    if "clicked" in df.columns and spec is IMPRESSIONS:
        bad = df.filter(pl.col("clicked").is_null() | ~pl.col("clicked").is_in([0, 1]))["clicked"]
        if bad.len():
            violations.append(
                Violation(RULE_CLICKED_DOMAIN, file, "clicked", f"{bad.len()} value(s) not 0/1, e.g. {_example(bad)}")
            )
    if spec is ITEMS:
        bare = df.filter(~has_image(df) & ~has_title())["item_id"]
        if bare.len():
            violations.append(
                Violation(
                    RULE_IMAGE_OR_TITLE, file, "title",
                    f"{bare.len()} item(s) with neither a title nor an image, e.g. item_id {_example(bare)}",
                )
            )
        violations += image_violations(df, file)
    return violations


def day_violations(df: pl.DataFrame, day: dt.date, file: str) -> list[Violation]:
    """Rows of a `date=DAY` folder must have a non-null `ts` on that UTC day."""
    off = df.filter(pl.col("ts").is_null() | (pl.col("ts").dt.date() != day))["ts"]
    if not off.len():
        return []
    return [
        Violation(
            RULE_ROWS_ON_DAY, file, "ts",
            f"{off.len()} row(s) not on {day.isoformat()} (UTC), e.g. {_example(off)}",
        )
    ]


def duplicate_id_violations(spec: TableSpec, files: list[tuple[str, pl.DataFrame]]) -> list[Violation]:
    """Ids must be unique across all files of the table; each file holding a repeated id is named."""
    key = spec.id_columns[0]
    ids = pl.concat([frame.select(pl.col(key), pl.lit(name).alias("file")) for name, frame in files]).drop_nulls(key)
    repeated = ids.filter(pl.col(key).is_duplicated())
    violations = []
    for (name,), rows in repeated.group_by("file", maintain_order=True):
        dupes = rows[key].unique().sort()
        violations.append(Violation(RULE_UNIQUE_IDS, name, key, f"{dupes.len()} duplicated id(s), e.g. {_example(dupes)}"))
    return violations
