"""Smoke test of the benchmark harness: structure and sanity of the JSON, never speed.

Runs ``python -m benchmarks run --quick --only trace_overhead`` (the HF-side systems) and a
small vLLM run (plain vLLM eager and vinterp on vLLM, steered generation and capture, 2
repetitions) into temporary directories. Only nnsight may be skipped (without ``make
bench-setup``), with a reason; vinterp HF and raw hooks must measure every trace_overhead
task; every row of the vLLM run must have passed its per-repetition verification, and the
curated benchmarks/RESULTS.md must be left as it was.
"""

from __future__ import annotations

import hashlib
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
    files = list(out.glob("*/*.json"))   # one directory per run
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0].parent


def _curated() -> str:
    return hashlib.sha256((REPO / "benchmarks" / "RESULTS.md").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-vllm")
    before = _curated()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "steer_generate",
         "capture", "--systems", "vllm_eager", "vinterp_vllm", "--reps", "2",
         "--results-dir", str(out), "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _curated() == before, "a run rewrote benchmarks/RESULTS.md"
    (run_dir,) = out.iterdir()
    data = json.loads((run_dir / f"{run_dir.name}.json").read_text())
    assert (run_dir / "RESULTS.md").exists()
    return data


def test_vllm_systems_measured_and_verified(vllm_run: dict) -> None:
    data = vllm_run
    assert not data["skipped"], data["skipped"]
    got = {(r["system"], r["workload"], r["case"]) for r in data["rows"]}
    assert got >= {("vllm_eager", "steer_generate", "none"),
                   ("vllm_eager", "capture", "prefill"),
                   *{("vinterp_vllm", "steer_generate", c)
                     for c in ("none", "shared_1layer", "distinct_1layer",
                               "distinct_all_layers")},
                   ("vinterp_vllm", "capture", "last_all_layers"),
                   ("vinterp_vllm", "capture", "full_4layers")}
    sizes = data["sizes"]
    for r in data["rows"]:
        assert r["verified"] == r["reps"] == 2, r
        assert r["rep_index"] == [0, 1]
        if r["workload"] == "steer_generate":   # measured: every prompt's new tokens
            assert r["tokens"] == sizes["gen_prompts"] * sizes["gen_new_tokens"]
        if r["system"] == "vinterp_vllm" and r["case"] not in ("none",) \
                and r["workload"] == "steer_generate":
            changed, compared = r["changed"]
            assert 0 < changed <= compared == min(8, sizes["gen_prompts"])
    # the system order rotates from one repetition to the next
    for orders in data["system_order"].values():
        assert orders == [["vllm_eager", "vinterp_vllm"], ["vinterp_vllm", "vllm_eager"]]


def test_json_structure(result: tuple[dict, Path]) -> None:
    data, _ = result
    for key in ("schema", "date", "quick", "model", "machine", "sizes", "reps", "systems",
                "skipped", "rows", "workloads", "steer_scale", "seed", "engine_modes"):
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
    # Only nnsight may be skipped (its .bench-venv comes from `make bench-setup` and may be
    # absent): a vinterp HF or raw-hooks worker that fails setup, or a task of theirs that
    # fails or does not verify, is an entry in `skipped` and must fail this test.
    assert [s for s in data["skipped"] if s["system"] != "nnsight"] == []
    # vinterp HF and plain HF need nothing but the main venv: every trace_overhead task of
    # theirs must have a row (a lost task would otherwise leave the other rows passing).
    cases = {system: {r["case"] for r in data["rows"] if r["system"] == system}
             for system in measured}
    assert cases.get("vinterp_hf") == {"plain_forward", "empty", "save_1", "save_12"}, cases
    assert cases.get("hf_hooks") == {"plain_forward", "save_1", "save_12"}, cases
    if "nnsight" in measured:   # measured: all four tasks, or the missing ones skipped
        lost = {s["what"].split("/")[1] for s in data["skipped"]
                if s["system"] == "nnsight" and s["what"] != "*"}
        assert cases["nnsight"] | lost == {"plain_forward", "empty", "save_1", "save_12"}


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
    data = json.loads(next(tmp_path.glob("*/*.json")).read_text())
    lost = [s for s in data["skipped"] if s["system"] == "hf_hooks"]
    assert [s["what"] for s in lost] == [doomed]
    assert "SIGKILL" in lost[0]["reason"]
    measured = {r["case"] for r in data["rows"] if r["system"] == "hf_hooks"}
    assert measured == {"plain_forward", "save_12"}
