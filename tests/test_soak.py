"""The soak run (benchmarks/soak.py) in its bounded form, against the tiny model on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_soak_quick_run_holds(tiny_checkpoint, service_index_root, tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--quick", "--checkpoint",
               str(tiny_checkpoint.path), "--index", str(service_index_root), "--out", str(out),
               "--server-env", "TRANSRESNET_MAX_IN_FLIGHT=8", "--server-env", "TRANSRESNET_DEVICE=cpu",
               "--server-env", "TRANSRESNET_HEADER_TIMEOUT_S=5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    # soak.py exits 1 on any failed request, the overload phase's included; this bounded form judges that
    # phase with its own tolerance below, so it asks only that the run completed and wrote its report.
    assert done.returncode in (0, 1) and out.is_file(), done.stdout[-4000:] + done.stderr[-4000:]
    rows = {row["phase"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"load", "leak", "overload", "abandon", "swap", "big-uploads", "hostile"}
    steady = {phase: row for phase, row in rows.items() if phase != "overload"}
    assert all(row["failures"] == 0 for row in steady.values()), {p: r["failure_kinds"] for p, r in steady.items()}
    overload = rows["overload"]
    # 256 clients and the server share two cores here: a rare reset under that overload is counted and
    # reported (docs/reliability.md), and the bounded form tolerates at most 1% of them.
    assert overload["failures"] <= overload["requests"] // 100, overload["failure_kinds"]
    assert overload["503"] > 0 and overload["ok"] > 0
    assert overload["probe_p99_503_ms"] < 1000  # refused at once, not after queueing (tens of ms when idle)
    assert rows["abandon"]["completed_after_gone"] <= rows["abandon"]["requests"] // 4
    assert "phase" in done.stdout and "written" in done.stdout
