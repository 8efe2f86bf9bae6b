"""Where every benchmark writes its JSON report, and how a generated table lands in README.md."""

import json
from pathlib import Path


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


README = Path(__file__).parent.parent / "README.md"


def paste_into_readme(name: str, table: str) -> None:
    """Replace what stands between README's marker lines `<!-- {name} begins...` and `<!-- {name} ends -->`."""
    begins, ends = f"<!-- {name} begins", f"<!-- {name} ends -->"
    text = README.read_text()
    if begins not in text or ends not in text:
        raise SystemExit(f"{README} has no lines starting {begins!r} and {ends!r} to paste the table between")
    head, rest = text.split(begins, 1)
    marker, _ = rest.split("\n", 1)
    _, tail = rest.split(ends, 1)
    README.write_text(f"{head}{begins}{marker}\n{table}{ends}{tail}")
    print(f"pasted the table into {README}")


def write_markdown(path: Path, markdown: str, readme: bool) -> None:
    """A benchmark's tables: written to `path`, printed, and with `readme` pasted into README.md
    between the marker lines named after the file."""
    path.write_text(markdown)
    print(markdown)
    if readme:
        paste_into_readme(path.name, markdown)
