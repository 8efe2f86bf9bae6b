"""Raw sources: the day's impressions, the item catalog and user profiles, validated on read.
These assets do not copy the raw data: materializing one validates it against the contract,
records what it holds, and reports each contract rule as an asset check. A broken input fails
the step with every problem named, so nothing downstream runs; later stages read the raw data
through the same validating `RawStore`.
"""


import datetime as dt
from typing import Iterator

import dagster as dg

from saviorrec_pipeline.assets.common import RAW_GROUP
from saviorrec_pipeline.contract import (
    IMPRESSION_RULES,
    ITEM_RULES,
    PROFILE_RULES,
    Violation,
    has_image,
    has_title,
)
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.resources.raw import RawRead, RawStore

DUPLICATES_CHECK = "duplicate_impressions"


def _rule_specs(asset: str, rules: tuple[str, ...]) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(rule, asset=asset, blocking=True, description=f"raw contract rule: {rule}")
        for rule in rules
    ]


def _rule_results(rules: tuple[str, ...], violations: list[Violation]) -> Iterator[dg.AssetCheckResult]:
    for rule in rules:
        broken = [str(v) for v in violations if v.rule == rule]
        yield dg.AssetCheckResult(
            check_name=rule,
            passed=not broken,
            metadata={"violations": len(broken), "details": dg.MetadataValue.md("\n".join(f"- {b}" for b in broken[:20]) or "none")},
        )


def _validated(read: RawRead, rules: tuple[str, ...]) -> Iterator[dg.AssetCheckResult]:
    """Yield one result per rule; then refuse the input if any rule is broken."""
    yield from _rule_results(rules, read.violations)
    read.checked()


def _files_metadata(read: RawRead) -> dict:
    """Files read, and what else lay in the folder (skipped, not an error: e.g. Spark's `_SUCCESS`)."""
    return {
        "files": len(read.files),
        "ignored_files": len(read.ignored),
        "ignored_file_names": ", ".join(read.ignored) or "none",
    }


@dg.asset(
    group_name=RAW_GROUP,
    partitions_def=daily_partitions,
    check_specs=_rule_specs("impressions", IMPRESSION_RULES)
    + [dg.AssetCheckSpec(DUPLICATES_CHECK, asset="impressions", description="repeated (user_id, item_id, ts)")],
    description="One day of raw impressions (raw_root/impressions/date=D/*.parquet), validated.",
)
def impressions(context: dg.AssetExecutionContext, raw: RawStore) -> Iterator:
    day = dt.date.fromisoformat(context.partition_key)
    read = raw.inspect_impressions(day)
    yield from _validated(read, IMPRESSION_RULES)
    frame = read.frame
    yield dg.AssetCheckResult(
        check_name=DUPLICATES_CHECK,
        passed=read.duplicates_dropped == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"duplicates_dropped": read.duplicates_dropped},
    )
    clicks = int(frame["clicked"].sum())
    yield dg.MaterializeResult(
        metadata={
            "folder": dg.MetadataValue.path(raw.impressions_folder(day)),
            **_files_metadata(read),
            "rows": frame.height,
            "clicks": clicks,
            "ctr": round(clicks / frame.height, 5) if frame.height else 0.0,
            "users": frame["user_id"].n_unique(),
            "items": frame["item_id"].n_unique(),
            "has_base_pctr": "base_pctr" in frame.columns,
            "duplicates_dropped": read.duplicates_dropped,
        }
    )


@dg.asset(
    group_name=RAW_GROUP,
    check_specs=_rule_specs("item_catalog", ITEM_RULES),
    description="The item catalog (raw_root/items/*.parquet), validated.",
)
def item_catalog(raw: RawStore) -> Iterator:
    read = raw.inspect_items()
    yield from _validated(read, ITEM_RULES)
    items = read.frame
    counts = items.select(has_image(items).sum().alias("with_image"), has_title().sum().alias("with_title")).row(0, named=True)
    yield dg.MaterializeResult(
        metadata={**_files_metadata(read), "items": items.height, **{k: int(v) for k, v in counts.items()}}
    )


@dg.asset(
    group_name=RAW_GROUP,
    check_specs=_rule_specs("user_profiles", PROFILE_RULES),
    description="Optional user profiles (raw_root/users/*.parquet): user_id plus categorical columns.",
)
def user_profiles(raw: RawStore) -> Iterator:
    read = raw.inspect_users()
    yield from _validated(read, PROFILE_RULES)
    profile_columns = [c for c in read.frame.columns if c != "user_id"]
    yield dg.MaterializeResult(
        metadata={
            **_files_metadata(read),
            "users": read.frame.height,
            "profile_columns": ", ".join(profile_columns) or "none",
        }
    )
