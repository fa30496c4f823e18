"""Smoke test of the benchmark harness: structure and sanity of the JSON, never speed.

Runs ``python -m benchmarks run --quick --only trace_overhead`` into a temporary directory
(so the repository's results stay untouched). Systems that cannot run here (nnsight without
``make bench-setup``, a backend not built yet) must appear in ``skipped`` with a reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"vinterp_hf", "nnsight", "hf_hooks"}  # the systems with trace_overhead tasks


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "trace_overhead",
         "--results-dir", str(out), "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), out


def test_json_structure(result: tuple[dict, Path]) -> None:
    data, _ = result
    for key in ("schema", "date", "quick", "model", "machine", "sizes", "reps", "systems",
                "skipped", "rows", "workloads"):
        assert key in data, key
    assert data["quick"] is True
    assert data["workloads"] == ["trace_overhead"]
    assert data["model"] == "smollm2-135m"


def test_rows_positive_and_finite(result: tuple[dict, Path]) -> None:
    data, _ = result
    for row in data["rows"]:
        assert row["workload"] == "trace_overhead"
        assert row["metric"] == "seconds"
        assert row["dtype"] == "float32"
        assert row["reps"] == len(row["values"]) >= 1
        for v in [*row["values"], row["median"], row["min"], row["max"]]:
            assert math.isfinite(v) and v > 0
        assert row["min"] <= row["median"] <= row["max"]


def test_every_system_measured_or_skipped_with_reason(result: tuple[dict, Path]) -> None:
    data, _ = result
    measured = {r["system"] for r in data["rows"]}
    whole_skips = {s["system"]: s["reason"] for s in data["skipped"] if s["what"] == "*"}
    for system in EXPECTED:
        assert system in measured or system in whole_skips, system
        if system in whole_skips:
            assert whole_skips[system].strip()
    for s in data["skipped"]:
        assert s["reason"].strip(), s
    # Plain HF needs nothing but the main venv: its rows must exist.
    assert {r["case"] for r in data["rows"] if r["system"] == "hf_hooks"} >= {"plain_forward"}


def test_report_written(result: tuple[dict, Path]) -> None:
    _, out = result
    text = (out / "RESULTS.md").read_text()
    assert "| workload | case | system |" in text
    assert "trace_overhead" in text


def test_a_killed_worker_costs_only_its_task(tmp_path: Path) -> None:
    """A worker killed mid-task (as by the OOM killer) is restarted; later tasks still run."""
    doomed = "trace_overhead/save_1/raw_hooks"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "trace_overhead",
         "--systems", "hf_hooks", "--reps", "1", "--results-dir", str(tmp_path),
         "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), VINTERP_BENCH_DIE_ON=f"hf_hooks:{doomed}"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hf_hooks worker restarted" in proc.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    lost = [s for s in data["skipped"] if s["system"] == "hf_hooks"]
    assert [s["what"] for s in lost] == [doomed]
    assert "SIGKILL" in lost[0]["reason"]
    measured = {r["case"] for r in data["rows"] if r["system"] == "hf_hooks"}
    assert measured == {"plain_forward", "save_12"}
