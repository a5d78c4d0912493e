"""Shared helpers of the benchmark scripts: environment, timing, machine description, tables, JSON, and the
`transresnet serve` subprocess and request bodies the service benchmarks drive."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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


def mixture(n: int, dim: int, *, seed: int, clusters: int = 1000, latent: int = 64,
            chunk: int = 100_000) -> np.ndarray:
    """Unit vectors from a gaussian mixture in a ``latent``-d subspace, plus isotropic noise (real caption
    embeddings have low intrinsic dimension and cluster by topic)."""
    import numpy as np  # here, so setup_env() runs before numpy's BLAS reads its thread settings

    rng = np.random.default_rng(seed)
    model_rng = np.random.default_rng(12345)  # centres and projection shared by database and queries
    centres = model_rng.standard_normal((clusters, latent)).astype(np.float32)
    spread = model_rng.uniform(0.6, 1.4, size=clusters).astype(np.float32)  # some topics are broader
    projection = (model_rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.integers(clusters, size=m)
        z = centres[labels] + spread[labels, None] * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ projection + 0.25 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    return format_table(header, rows, numeric=True)


def write_json(path: Path | None, name: str, data: dict[str, Any]) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def multipart_body(data: bytes, traits: Sequence[str], k: int = 5, filename: str = "photo.jpg",
                   content_type: str = "image/jpeg", fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A ready-made multipart caption request, so a load client spends no CPU encoding it during a run;
    ``fields``: more form fields (mode, beam_size)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
             f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"]
    extra = list((fields or {}).items())
    for name, value in [("k", str(k))] + [("personality", t) for t in traits] + extra:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`transresnet serve` in a subprocess on a free loopback port; ``start`` waits for /readyz."""

    def __init__(self, flags: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "transresnet", "serve", "--port", str(self.port), "--log-level",
                   "warning", *flags]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=cwd)

    def start(self, timeout: float = 300.0) -> None:
        from transresnet.service.readiness import wait_until_ready

        try:
            wait_until_ready(self.base_url, self.process, timeout=timeout)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; see {self.log.name}") from None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
