"""Wall time, throughput and peak memory of a stage, for Dagster metadata."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0  # when the block began: the peak above it is what the block added

    def metadata(self, work_items: int | None = None, unit: str = "rows") -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "seconds": round(self.seconds, 3),
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
        }
        if work_items is not None:
            out[f"{unit}_per_s"] = round(work_items / max(self.seconds, 1e-9), 1)
        return out


@contextmanager
def track_usage(sample_every_s: float = 0.05) -> Iterator[Usage]:
    """Measure the block: wall seconds and the process's peak resident memory while it ran.

    Sampled from a thread because the OS high-water mark covers the whole process lifetime,
    not just this block.
    """
    process = psutil.Process()
    usage = Usage(start_rss_bytes=process.memory_info().rss)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            usage.peak_rss_bytes = max(usage.peak_rss_bytes, process.memory_info().rss)
            done.wait(sample_every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        yield usage
    finally:
        done.set()
        sampler.join()
        usage.seconds = time.perf_counter() - start
        usage.peak_rss_bytes = max(usage.peak_rss_bytes, process.memory_info().rss)
