"""The report's arithmetic on hand-made rows: ratios, baselines, targets and curves.

No benchmark runs here; the rows are what ``runner.summarize`` writes, with round numbers so
every expected ratio can be checked by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report


def row(system: str, workload: str, case: str, variant: str, median: float,
        metric: str = "tokens_per_s", items: int = 64, values: list[float] | None = None
        ) -> dict:
    values = values or [median] * 5
    return {"system": system, "workload": workload, "case": case, "variant": variant,
            "metric": metric, "median": median, "min": min(values), "max": max(values),
            "reps": len(values), "values": values, "rep_index": list(range(len(values))),
            "items": items, "dtype": "float32"}


ROWS = [
    row("vllm_eager", "steer_generate", "none", "batched", 400.0),
    row("vllm_compiled", "steer_generate", "none", "batched", 500.0),
    row("vinterp_vllm", "steer_generate", "distinct_1layer", "batched", 380.0),
    row("vinterp_vllm", "steer_generate", "none", "batched", 400.0),
    row("nnsight", "steer_generate", "distinct_1layer", "invokes", 200.0),
    row("nnsight", "steer_generate", "distinct_1layer", "one_at_a_time", 20.0, items=16),
    row("vllm_eager", "concurrency", "c4", "batched", 100.0, items=4),
    row("vinterp_vllm", "concurrency", "c4", "batched", 90.0, items=4),
    row("nnsight", "patch_sweep", "grid", "seed_loop", 30.0, "seconds", 1),
    row("nnsight", "patch_sweep", "grid", "invokes_per_layer", 8.0, "seconds", 1),
    row("vinterp_vllm", "patch_sweep", "grid", "one_batch", 5.0, "seconds", 1),
    row("vinterp_hf", "trace_overhead", "plain_forward", "trace", 0.100, "seconds", 20),
    row("vinterp_hf", "trace_overhead", "save_12", "trace", 0.105, "seconds", 20),
    row("nnsight", "trace_overhead", "plain_forward", "trace", 0.100, "seconds", 20),
    row("nnsight", "trace_overhead", "save_12", "trace", 0.120, "seconds", 20),
]


def find(system: str, workload: str, case: str, variant: str) -> dict:
    r = report._find(ROWS, system, workload, case, (variant,))
    assert r is not None
    return r


def test_steering_compares_with_unsteered_plain_vllm_and_both_nnsight_forms() -> None:
    q = report.ratios(find("vinterp_vllm", "steer_generate", "distinct_1layer", "batched"), ROWS)
    assert q["vllm_eager"] == pytest.approx(380 / 400)
    assert q["vllm_compiled"] == pytest.approx(380 / 500)
    assert q["nnsight"] == pytest.approx(380 / 200)
    assert q["nnsight_serial"] == pytest.approx(380 / 20)


def test_serial_nnsight_ratio_only_for_the_case_it_ran() -> None:
    # nnsight one at a time runs distinct_1layer only: the unsteered row gets no serial ratio
    q = report.ratios(find("vinterp_vllm", "steer_generate", "none", "batched"), ROWS)
    assert q["nnsight_serial"] is None
    assert q["vllm_eager"] == pytest.approx(1.0)


def test_concurrency_compares_at_the_same_level() -> None:
    q = report.ratios(find("vinterp_vllm", "concurrency", "c4", "batched"), ROWS)
    assert q["vllm_eager"] == pytest.approx(0.9)


def test_wall_time_rows_invert() -> None:
    q = report.ratios(find("vinterp_vllm", "patch_sweep", "grid", "one_batch"), ROWS)
    assert q["nnsight"] == pytest.approx(8 / 5)
    assert q["nnsight_serial"] == pytest.approx(30 / 5)
    assert q["vllm_eager"] is None  # plain vLLM has no patching baseline


def test_trace_overhead_is_relative_to_the_same_workers_forward() -> None:
    q = report.ratios(find("vinterp_hf", "trace_overhead", "save_12", "trace"), ROWS)
    assert q["own_plain_forward"] == pytest.approx(1.05)
    # the plain forward is not compared with nnsight's trace
    assert report.ratios(find("vinterp_hf", "trace_overhead", "plain_forward", "trace"),
                         ROWS)["nnsight"] is None


def test_targets_report_met_missed_and_unmeasured() -> None:
    text = "\n".join(report.targets({"rows": ROWS}))
    base = "| 1c distinct vector, 1 layer ≥ 0.95× plain"
    five = "(0.95–0.95, 5 reps)"
    assert f"{base} (vllm_eager) | vinterp_vllm | 0.95× {five} | yes |" in text
    assert f"{base} (vllm_compiled) | vinterp_vllm | 0.76× (0.76–0.76, 5 reps) | no |" in text
    assert "| 3 ≥ 4× nnsight seed loop | vinterp_vllm | 6.00× (6.00–6.00, 5 reps) | yes |" \
        in text
    assert "| 4 ≥ 10× nnsight one at a time | vinterp_vllm | not measured | |" in text
    assert ("| 5 12-save trace ≤ 1.1× plain forward | vinterp_hf | 1.05× (1.05–1.05, 5 reps) "
            "| yes |") in text
    assert "1.05× (1.05–1.05, 5 reps) vs nnsight 1.20× (1.20–1.20, 5 reps)" in text


def test_paired_ratios_follow_repetitions_and_say_when_within_noise() -> None:
    # the machine slowed down in repetition 3 for both: paired ratios see through it
    plain = row("vinterp_hf", "trace_overhead", "plain_forward", "trace", 0.10, "seconds", 20,
                values=[0.10, 0.10, 0.20, 0.10, 0.10])
    traced = row("vinterp_hf", "trace_overhead", "save_12", "trace", 0.104, "seconds", 20,
                 values=[0.104, 0.096, 0.21, 0.115, 0.102])
    xs = report.paired(traced, plain, "own_plain_forward")
    assert xs == pytest.approx([1.04, 0.96, 1.05, 1.15, 1.02])
    assert report.spread(xs) == "1.04× (0.96–1.15, 5 reps)"
    assert report.verdict(xs, 1.1, higher=False) == "within noise (4 of 5 reps meet it)"
    assert report.verdict([1.2, 1.3], 1.1, higher=False) == "no"
    assert report.verdict([0.9, 1.0], 1.1, higher=False) == "yes"
    lines = report.overhead_table({"rows": [plain, traced]})
    assert "| vinterp_hf | save_12 | 1.04× (0.96–1.15, 5 reps) | within noise of a plain " \
           "forward |" in lines
    # a repetition one row lost (a failed verification) pairs by repetition, not position
    lost = dict(traced, values=[0.104, 0.115, 0.102], rep_index=[0, 3, 4])
    assert report.paired(lost, plain, "own_plain_forward") == pytest.approx([1.04, 1.15, 1.02])
    # wall-time rows are speed ratios: the baseline's time over the row's
    a = row("nnsight", "patch_sweep", "grid", "seed_loop", 30.0, "seconds", 1,
            values=[30.0, 60.0])
    b = row("vinterp_vllm", "patch_sweep", "grid", "one_batch", 5.0, "seconds", 1,
            values=[5.0, 10.0])
    assert report.paired(b, a, "nnsight_serial") == pytest.approx([6.0, 6.0])


def test_concurrency_curve_points() -> None:
    curves = report.concurrency_curves(ROWS)
    assert sorted(curves[("vinterp_vllm", "batched")]) == [4, 64]
    assert sorted(curves[("vllm_eager", "batched")]) == [4, 64]  # unsteered top point
    # nnsight one at a time is the concurrency-1 point of its own curve: nnsight's c1 invokes
    # row, also at 1, must not replace it (nor it the c1 row)
    c1 = row("nnsight", "concurrency", "c1", "invokes", 13.0, items=1)
    both = report.concurrency_curves([*ROWS, c1])
    assert both[("nnsight", "serial")][1]["variant"] == "one_at_a_time"
    assert both[("nnsight", "invokes")][1] is c1
    assert curves[("nnsight", "serial")][1]["variant"] == "one_at_a_time"


def test_table_gives_per_request_time_for_one_at_a_time_rows_only() -> None:
    serial = dict(find("nnsight", "steer_generate", "distinct_1layer", "one_at_a_time"),
                  seconds_per_request=3.2)
    batched = dict(find("nnsight", "steer_generate", "distinct_1layer", "invokes"),
                   seconds_per_request=0.25)
    lines = report.table({"rows": [serial, batched]})
    header = [c.strip() for c in lines[0].split("|")]
    col = header.index("s per request")
    assert [c.strip() for c in lines[2].split("|")][col] == "3.20 s"
    assert [c.strip() for c in lines[3].split("|")][col] == ""
    assert all(len(line.split("|")) == len(lines[0].split("|")) for line in lines)


def fake_run(workloads: list[str], rows: list[dict]) -> dict:
    return {"date": "2026-11-26T00:00:00", "model": "smollm2-135m", "wall_s": 60.0,
            "quick": False, "workloads": workloads, "machine": {"cpu_count": 2},
            "reps": 5, "threads": 1, "sizes": {}, "skipped": [], "rows": rows,
            "systems": {r["system"]: {"versions": {}, "dtype": "float32"} for r in rows}}


def test_combined_report_keeps_each_runs_ratios_to_itself(tmp_path: Path) -> None:
    steer = [r for r in ROWS if r["workload"] == "steer_generate"]
    # the second run measures plain vLLM twice as fast: its rows must not change run 1's ratio
    faster = [dict(r, median=r["median"] * 2, values=[v * 2 for v in r["values"]])
              if r["system"].startswith("vllm_") else r for r in steer]
    report.write_combined([("a.json", fake_run(["steer_generate"], steer)),
                           ("b.json", dict(fake_run(["steer_generate"], faster),
                                           note="rerun"))], tmp_path, note="two runs")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Run 1 of 2: steer_generate (`a.json`)" in text
    assert "## Run 2 of 2: steer_generate (`b.json`)" in text
    assert "two runs" in text and "- note: rerun" in text
    run1, run2 = text.split("## Run 2 of 2")
    eager = "1c distinct vector, 1 layer ≥ 0.95× plain (vllm_eager) | vinterp_vllm"
    assert f"{eager} | 0.95× (0.95–0.95, 5 reps) | yes |" in run1
    assert f"{eager} | 0.47× (0.47–0.47, 5 reps) | no |" in run2
    assert "| 3 ≥ 4× nnsight seed loop" not in text  # no patch_sweep in these runs


def test_sections_say_what_was_verified_and_what_older_runs_ran_with() -> None:
    steer = [r for r in ROWS if r["workload"] == "steer_generate"]
    # a run from before verification existed: no system_order, no verified fields, the plugin
    # recorded no engine mode (it had only eager mode then)
    old = fake_run(["steer_generate"], steer)
    old["systems"]["vllm_eager"]["enforce_eager"] = True
    text = "\n".join(report.provenance(old))
    assert f"verified 0/{len(steer)} rows: run before verification existed" in text
    assert "steering strength 4" in text and "same system order" in text
    assert "vllm_eager eager" in text and "vinterp_vllm **eager** (the eager-only plugin" in text
    # a run with verification: k of n rows, the steering norm and modes as recorded
    rows = [dict(r, verified=5) if r["system"] == "vinterp_vllm" else r for r in steer]
    new = dict(fake_run(["steer_generate"], rows), system_order={}, steer_scale=64.0, seed=0,
               engine_modes={"vinterp_vllm": "compiled"}, date="2026-12-07T00:00:00")
    lines = report.provenance(new)
    assert lines[0].startswith(f"- verified 2/{len(rows)} rows")
    assert "steering vectors of norm 64.0, seed 0" in lines[1]
    assert lines[2] == "- vLLM engine modes: vinterp_vllm compiled"
    assert "verified 2/" in "\n".join(report.section(new))
    # patch sweeps are not checked by verify.py: said, not counted as failures
    sweep = dict(fake_run(["patch_sweep"], [r for r in ROWS if r["workload"] == "patch_sweep"]),
                 system_order={})
    assert "3 rows are of kinds verify.py does not check" in report.provenance(sweep)[0]


def test_server_section_says_each_servers_mode() -> None:
    from benchmarks.server_load import modes_text

    assert modes_text({"modes": {"vllm_serve": "compiled", "vinterp": "compiled"}}) \
        == "both servers compiled float32"
    assert "different modes" in modes_text({"modes": {"vllm_serve": "eager",
                                                      "vinterp": "compiled"}})
    assert modes_text({}).startswith("both servers eager float32 (the JSON records no mode")
