"""Shared helpers of the benchmark scripts: environment, timing, machine description, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transresnet.runtime import apply_runtime_defaults
from transresnet.tables import format_table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"


def setup_env() -> None:
    """Before torch/faiss load: the project's runtime defaults, and no model hub (benchmarks are offline)."""
    apply_runtime_defaults()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def loadavg() -> list[str] | None:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def rate(fn: Callable[[], Any], items: int, *, min_seconds: float = 1.0, max_repeats: int = 50,
         min_repeats: int = 1) -> float:
    """Items per second: repeat ``fn`` (which handles ``items`` items) for at least ``min_seconds``;
    the median call time counts (robust to other processes on a shared machine)."""
    times: list[float] = []
    while (len(times) < min_repeats or sum(times) < min_seconds) and len(times) < max_repeats:
        times.append(timed(fn)[0])
    return items / statistics.median(times)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    return format_table(header, rows, numeric=True)


def write_json(path: Path | None, name: str, data: dict[str, Any]) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
