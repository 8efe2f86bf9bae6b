"""The checkout's deployment files as the tests read them."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_example() -> dict[str, str]:
    """.env.example's variables and their example values."""
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
