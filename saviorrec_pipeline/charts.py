"""Charts for asset metadata and MLflow: matplotlib off-screen, as PNG bytes and inline markdown."""

import base64
import io
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def figure(width: float, height: float, panels: int = 1) -> Iterator[tuple[object, dict]]:
    """(axis, out): draw on `axis` (with `panels` > 1, a list of that many side by side); on
    leaving, `out["png"]` holds the figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawing, axis = plt.subplots(1, panels, figsize=(width, height))
    axis = list(axis) if panels > 1 else axis
    out: dict = {}
    try:
        yield axis, out
        drawing.tight_layout()
        buffer = io.BytesIO()
        drawing.savefig(buffer, format="png", dpi=100)
        out["png"] = buffer.getvalue()
    finally:
        plt.close(drawing)


def markdown_image(title: str, png: bytes) -> str:
    """The PNG inline in markdown, which Dagster's UI shows in the metadata panel."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"
