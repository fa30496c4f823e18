"""The steering_eval benchmark's arithmetic and report on hand-made numbers: the grid, the
per-cell extrapolation of the nnsight arms, speedups against the targets, and the section
``python -m benchmarks report`` renders for such a run. No benchmark runs here."""

from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.steering_eval import add_speedups, extrapolate, grid, steering_section


def test_grid_is_layers_by_scales():
    cells = grid(10, 9, 30)
    assert len(cells) == 90
    assert sorted({c[0] for c in cells}) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert sorted({c[1] for c in cells}) == [-1.5, -1.125, -0.75, -0.375, 0.0, 0.375, 0.75,
                                             1.125, 1.5]
    assert grid(2, 3, 30) == [(10, -1.5), (10, 0.0), (10, 1.5), (20, -1.5), (20, 0.0),
                              (20, 1.5)]


def _result():
    arms = {"vinterp_one_batch": {"seconds": 600.0, "tok_s": 240.0, "extrapolated": False},
            "nnsight_looped": {**extrapolate([70.0, 80.0, 90.0], 90, 1600),
                               "cells": [[2, -1.5], [8, 0.375], [20, 1.5]],
                               "same_tokens_as_vinterp": "140/150"},
            "nnsight_per_cell": {**extrapolate([12.0, 14.0, 16.0], 90, 1600),
                                 "cells": [[2, -1.5], [8, 0.375], [20, 1.5]],
                                 "same_tokens_as_vinterp": "139/150"}}
    add_speedups(arms)
    return {"kind": "steering_eval", "workloads": ["steering_eval"], "model": "smollm2-135m",
            "date": "2026-11-27 15:00", "cpus": 2, "layers": 10, "scales": 9, "cells": 90,
            "prompts": 50, "tokens": 32, "generations": 4500, "generated_tokens": 144000,
            "vector_norm": 20.0, "vinterp_vllm_mode": "compiled", "note": "",
            "versions": {"vinterp": "0.1.0"}, "arms": arms, "load_start": [3.1, 4.0, 5.0],
            "load_end": [2.0, 3.0, 4.0], "wall_s": 1500.0}


def test_extrapolation_and_speedups():
    arms = _result()["arms"]
    looped, per_cell = arms["nnsight_looped"], arms["nnsight_per_cell"]
    assert looped["seconds"] == pytest.approx(80.0 * 90)          # mean per cell x cells
    assert (looped["seconds_min"], looped["seconds_max"]) == pytest.approx((6300.0, 8100.0))
    assert looped["tok_s"] == pytest.approx(20.0)                 # 1600 tokens in 80 s
    assert looped["cells_timed"] == 3 and looped["extrapolated"] is True
    assert looped["speedup"] == pytest.approx(12.0)
    assert looped["speedup_range"] == pytest.approx([10.5, 13.5])
    assert per_cell["speedup"] == pytest.approx(2.1)
    assert per_cell["speedup_range"] == pytest.approx([1.8, 2.4])
    assert "speedup" not in arms["vinterp_one_batch"]


def test_section_says_extrapolated_and_judges_targets():
    text = "\n".join(steering_section(_result()))
    assert "4,500 generations, 144,000 generated tokens" in text
    assert "the machine was shared with other work" in text       # load 3.1 at start
    assert ("| nnsight_looped | nnsight generate per generation, looped cell by cell | "
            "**7200 s extrapolated** from 3 of 90 cells (6300–8100 s by the fastest/slowest "
            "cell) | 20.0 | 12.0× (10.5–13.5) | ≥ 10× | yes |") in text
    # 1.8-2.4x against >= 2x: the slowest and fastest cell disagree
    assert "| 2.1× (1.8–2.4) | ≥ 2× | within range |" in text
    assert "| vinterp_one_batch | vllm backend, the whole grid as one generate trace | 600 s " \
           "| 240.0 |" in text
    assert "each arm timed cells drawn at random from the grid (nnsight_looped 3 cells " \
           "(L2/-1.5, L8/+0.375, L20/+1.5); nnsight_per_cell 3 cells" in text
    assert "nnsight_looped 140/150, nnsight_per_cell 139/150 generations" in text


def test_report_renders_a_steering_run_as_its_own_section(tmp_path):
    report.write_combined([("results/steering-eval/x.json", _result())], tmp_path, "a note")
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Run 1 of 1: steering_eval (`results/steering-eval/x.json`)" in md
    assert "**7200 s extrapolated** from 3 of 90 cells" in md
