"""Waiting for a starting server: poll ``GET /readyz`` until the model and index are loaded."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_ready(base_url: str, process: subprocess.Popen | None = None, *, timeout: float = 90.0,
                     poll_seconds: float = 0.25) -> None:
    """Return once ``/readyz`` answers 200; RuntimeError if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(poll_seconds)
    raise RuntimeError(f"server at {base_url} not ready after {timeout:.0f}s")
