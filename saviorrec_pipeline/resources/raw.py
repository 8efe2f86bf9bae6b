"""Reads the raw input contract from `raw_root` (local or S3), validating on read."""

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from saviorrec_pipeline.contract import (
    IMPRESSION_KEY,
    IMPRESSIONS,
    ITEMS,
    RULE_READABLE,
    USERS,
    RawContractError,
    TableSpec,
    Violation,
    day_violations,
    duplicate_id_violations,
    normalise,
    schema_violations,
    value_violations,
)
from saviorrec_pipeline.files import filesystem
from saviorrec_pipeline.method.ranking_features import ranking_input


@dataclass
class RawRead:
    """One raw table as read: normalised rows (empty when unusable), what was wrong (and how to
    fix it, when the reader knows), and the names of entries in the folder that are not Parquet
    data files (skipped)."""

    frame: pl.DataFrame
    files: list[str]
    violations: list[Violation] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    hint: str = ""

    def checked(self) -> pl.DataFrame:
        if self.violations:
            raise RawContractError(self.violations, self.hint)
        return self.frame


# For Ray tasks: a Dagster resource does not survive pickling, so a task gets the root and these.
def clicks_of_day(raw_root: str, day: dt.date) -> pl.DataFrame:
    return RawStore(root=raw_root).read_clicks([day])


def impressions_of_day(raw_root: str, day: dt.date) -> pl.DataFrame:
    """The day's impressions with the columns the ranking rows are built from."""
    return ranking_input(RawStore(root=raw_root).read_impressions(day))


def missing_days_hint(days: list[dt.date]) -> str:
    """What to do about days whose impressions folder holds no data file."""
    columns = ", ".join(f"{c.name} ({c.expected})" for c in IMPRESSIONS.required)
    return (
        f"{len(days)} day(s) with no data file: {', '.join(day.isoformat() for day in days)}. A day that has not "
        f"landed is refused; to declare a day with no traffic, write a Parquet file with the impression columns "
        f"[{columns}] and no rows into impressions/date=YYYY-MM-DD/."
    )


class RawStore(dg.ConfigurableResource):
    """The raw data a user points the pipeline at, read and validated by the raw input contract."""

    root: str

    def impressions_folder(self, day: dt.date) -> str:
        return f"{self.root.rstrip('/')}/impressions/date={day.isoformat()}"

    def inspect_impressions(self, day: dt.date) -> RawRead:
        """Every file of one day, validated; duplicate impressions (same user, item, ts) keep
        their first row and are counted."""
        read = self._read_folder(IMPRESSIONS, self.impressions_folder(day), required=True, day=day)
        if not read.files:
            read.hint = missing_days_hint([day])
        before = read.frame.height
        read.frame = read.frame.unique(subset=list(IMPRESSION_KEY), keep="first", maintain_order=True)
        read.duplicates_dropped = before - read.frame.height
        return read

    def days_with_impressions(self) -> list[dt.date]:
        """Days whose `impressions/date=YYYY-MM-DD/` folder holds at least one Parquet data file."""
        fs, path = filesystem(f"{self.root.rstrip('/')}/impressions")
        if not fs.isdir(path):
            return []
        days = []
        for folder in fs.ls(path, detail=False):
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("date="):
                continue
            try:
                day = dt.date.fromisoformat(name.removeprefix("date="))
            except ValueError:
                continue  # not a day folder
            if _listing(fs, folder)[0]:
                days.append(day)
        return sorted(days)

    def read_impressions(self, day: dt.date) -> pl.DataFrame:
        return self.inspect_impressions(day).checked()

    def read_window(
        self, days: list[dt.date], keep: Callable[[pl.DataFrame], pl.DataFrame] = lambda frame: frame
    ) -> pl.DataFrame:
        """The impressions of a window of `days`, each day validated and reduced by `keep` as it is
        read (so a long window is held only as what is kept of it). A window with days missing is
        refused before any day is read, with every missing day named in one error."""
        self.require_days(days)
        return pl.concat([keep(self.read_impressions(day)) for day in days], how="diagonal_relaxed")

    def require_days(self, days: list[dt.date]) -> None:
        """Refuse a window with days missing, every missing day named in one error."""
        missing = []
        for day in days:
            folder = self.impressions_folder(day)
            fs, path = filesystem(folder)
            files, ignored = _listing(fs, path)
            if not files:
                missing.append((day, _no_data_files(folder, ignored)))
        if missing:
            raise RawContractError([violation for _, violation in missing], missing_days_hint([day for day, _ in missing]))

    def read_clicks(self, days: list[dt.date]) -> pl.DataFrame:
        """The click events (`user_id`, `item_id`, `ts`) of a window of `days`, read as `read_window` does."""
        return self.read_window(days, lambda frame: frame.filter(pl.col("clicked") == 1).select("user_id", "item_id", "ts"))

    def inspect_items(self) -> RawRead:
        return self._read_folder(ITEMS, f"{self.root.rstrip('/')}/items", required=True)

    def inspect_users(self) -> RawRead:
        """User profiles are optional: no `users/` folder reads as an empty table."""
        return self._read_folder(USERS, f"{self.root.rstrip('/')}/users", required=False)

    def read_item_groups(self) -> pl.DataFrame | None:
        """`item_id`, `group`: the planted topic group of each item that generated demo data keeps
        in `ground_truth/items.parquet` beside the contract folders; None where there is none (real
        data has no ground truth). Only the paper's Fig. 5 reads it, to colour its plot."""
        fs, path = filesystem(f"{self.root.rstrip('/')}/ground_truth/items.parquet")
        if not fs.isfile(path):
            return None
        try:
            with fs.open(path, "rb") as f:
                frame = pl.read_parquet(f, columns=["item_id", "topic_group"])
        except Exception as exc:  # a broken ground truth only leaves the plot uncoloured, but say why
            raise ValueError(f"{fs.unstrip_protocol(path)}: unreadable ground truth, expected columns item_id, topic_group ({exc})") from exc
        return frame.select(pl.col("item_id").cast(pl.Int64), pl.col("topic_group").cast(pl.Int32).alias("group"))

    def _read_folder(
        self, spec: TableSpec, folder: str, *, required: bool, day: dt.date | None = None
    ) -> RawRead:
        fs, path = filesystem(folder)
        files, ignored = _listing(fs, path)
        empty = pl.DataFrame(schema={c.name: c.cast or pl.Null for c in spec.required})
        if not files:
            return RawRead(empty, [], [_no_data_files(folder, ignored)] if required else [], ignored)
        named_frames, violations = [], []
        for file in files:
            name = fs.unstrip_protocol(file)
            frame, problems = _read_file(fs, file, spec, name)
            violations += problems
            if frame is not None:
                if day is not None:
                    violations += day_violations(frame, day, name)
                named_frames.append((name, frame))
        if spec.unique_ids and named_frames:
            violations += duplicate_id_violations(spec, named_frames)
        names = [fs.unstrip_protocol(f) for f in files]
        if violations:
            return RawRead(empty, names, violations, ignored)
        return RawRead(pl.concat([frame for _, frame in named_frames], how="diagonal_relaxed"), names, ignored=ignored)


def _no_data_files(folder: str, ignored: list[str]) -> Violation:
    skipped = f" (skipped: {', '.join(ignored)})" if ignored else ""
    return Violation(RULE_READABLE, folder, None, f"no Parquet files (*.parquet) found{skipped}")


def _listing(fs, path: str) -> tuple[list[str], list[str]]:
    """A folder's Parquet data files (paths) and the names of everything else in it, sorted.

    Data files end in `.parquet`; names starting with `_` or `.` are markers or writes in progress
    (Spark's `_SUCCESS`, `.crc` files, temporary uploads) and are skipped, as pyarrow datasets do.
    """
    if not fs.isdir(path):
        return [], []
    files, ignored = [], []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        if entry["name"].rstrip("/") == path.rstrip("/"):
            continue  # an S3 folder-marker object lists as the folder itself
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "file" and name.endswith(".parquet") and not name.startswith(("_", ".")):
            files.append(entry["name"])
        else:
            ignored.append(name)
    return files, ignored


def _read_file(fs, file: str, spec: TableSpec, name: str) -> tuple[pl.DataFrame | None, list[Violation]]:
    try:
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            problems = schema_violations(spec, parquet.schema_arrow, name)
            if problems:
                return None, problems
            table = parquet.read()
    except Exception as exc:  # any reader failure means the file is not usable Parquet
        return None, [Violation(RULE_READABLE, name, None, f"unreadable Parquet file ({exc})")]
    frame = normalise(spec, pl.from_arrow(table))
    problems = value_violations(spec, frame, name)
    return (None if problems else frame), problems
