"""Markdown tables, for Dagster metadata, MLflow artifacts and benchmark reports."""

from collections.abc import Iterable, Sequence


def table(header: Sequence[object], rows: Iterable[Sequence[object]], numeric_columns: int = 0) -> str:
    """A GitHub-flavoured markdown table, its last `numeric_columns` right-aligned; cells are written
    with str()."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * (len(header) - numeric_columns) + "--:|" * numeric_columns]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
