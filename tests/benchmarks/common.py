"""Shared set-up for `make bench`: the machine description and the embedded model."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "assets" / "data"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
            f"Python {platform.python_version()}")


def timed(fn, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def record(name: str, results: dict) -> None:
    """Hand a benchmark's figures to run_all.py (which sets TSDPO_BENCH_JSON to a folder)."""
    import json

    folder = os.environ.get("TSDPO_BENCH_JSON")
    if folder:
        Path(folder, f"{name}.json").write_text(json.dumps(results, indent=2))
