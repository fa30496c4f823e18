"""Turn a results JSON into benchmarks/RESULTS.md (tables, ratios, targets) and a PNG plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

# Baseline case of plain vLLM for each workload: plain vLLM cannot steer or capture, so the
# ratio is to what the same engine does with no intervention (issue 4's definition).
# plain vLLM's row a workload's rows compare with (concurrency: the same level)
VLLM_BASE_CASE = {"steer_generate": "none", "capture": "prefill", "many_users": "none"}
SAME_CASE = frozenset({"concurrency"})
NNSIGHT_BATCHED = ("invokes", "invokes_per_layer", "invokes_to_longest", "trace")
NNSIGHT_SERIAL = ("one_at_a_time", "seed_loop")


def speed(row: dict[str, Any]) -> float:
    """Higher is better: tokens/s, or runs per second for wall-time rows."""
    return row["median"] if row["metric"] == "tokens_per_s" else 1.0 / row["median"]


def _find(rows: list[dict], system: str, workload: str, case: str | None,
          variants: tuple[str, ...] | None = None) -> dict | None:
    for r in rows:
        if (r["system"] == system and r["workload"] == workload
                and (case is None or r["case"] == case)
                and (variants is None or r["variant"] in variants)):
            return r
    return None


def baselines(row: dict[str, Any], rows: list[dict]) -> dict[str, dict | None]:
    """The row each ratio of ``row`` compares with (None: no such ratio)."""
    w, c = row["workload"], row["case"]
    out: dict[str, dict | None] = {}
    for name in ("vllm_eager", "vllm_compiled"):
        base = _find(rows, name, w, c if w in SAME_CASE else VLLM_BASE_CASE.get(w, "-"))
        out[name] = base if row["system"] != name else None
    nn = None if c == "plain_forward" else _find(rows, "nnsight", w, c, NNSIGHT_BATCHED)
    out["nnsight"] = nn if row is not nn else None
    serial_case = None if w in ("many_users", "patch_sweep") else c
    ser = _find(rows, "nnsight", w, serial_case, NNSIGHT_SERIAL)
    if ser and w == "steer_generate" and c not in ("distinct_1layer",):
        ser = None
    out["nnsight_serial"] = ser if row is not ser else None
    out["own_plain_forward"] = None
    if w == "trace_overhead":  # time relative to the same worker's plain forward
        out["own_plain_forward"] = _find(rows, row["system"], w, "plain_forward")
    return out


def ratios(row: dict[str, Any], rows: list[dict]) -> dict[str, float | None]:
    """Speed ratios (>1 = faster than the baseline) to each baseline in the same run, from
    the medians; ``own_plain_forward`` is a time ratio (lower is better)."""
    out: dict[str, float | None] = {}
    for key, base in baselines(row, rows).items():
        if base is None:
            out[key] = None
        elif key == "own_plain_forward":
            out[key] = row["median"] / base["median"]
        else:
            out[key] = speed(row) / speed(base)
    return out


def _by_rep(row: dict[str, Any]) -> dict[int, float]:
    return dict(zip(row.get("rep_index", range(len(row["values"]))), row["values"],
                    strict=True))


def paired(row: dict[str, Any], base: dict[str, Any], key: str) -> list[float]:
    """The ratio of ``key`` repetition by repetition: each value of ``row`` against the
    baseline's value from the same repetition (they ran minutes apart, under the same load),
    instead of one median against another."""
    a, b = _by_rep(row), _by_rep(base)
    out = []
    for k in sorted(set(a) & set(b)):
        if key == "own_plain_forward":
            out.append(a[k] / b[k])                      # time over time: lower is better
        elif row["metric"] == "tokens_per_s":
            out.append(a[k] / b[k])
        else:
            out.append(b[k] / a[k])                      # speed: the baseline's time over ours
    return out


def spread(xs: list[float]) -> str:
    """``median× (min–max, n reps)`` of paired ratios."""
    return (f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f}, {len(xs)} "
            f"rep{'s' if len(xs) != 1 else ''})")


def verdict(xs: list[float], bound: float, higher: bool = True) -> str:
    """'yes' when every paired ratio meets the bound, 'no' when none does, and 'within
    noise' when the repetitions disagree (the difference is inside run-to-run noise)."""
    meets = [x >= bound if higher else x <= bound for x in xs]
    if all(meets):
        return "yes"
    if not any(meets):
        return "no"
    return f"within noise ({sum(meets)} of {len(xs)} reps meet it)"


def _fmt_value(row: dict[str, Any], v: float) -> str:
    if row["metric"] == "tokens_per_s":
        return f"{v:.1f}"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def _per_request(row: dict[str, Any]) -> str:
    """Seconds per request, for rows that serve requests one at a time (the subset's median)."""
    if row["variant"] != "one_at_a_time" or row.get("seconds_per_request") is None:
        return ""
    return f"{row['seconds_per_request']:.2f} s"


def table(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    header = ("| workload | case | system | variant | unit | median | min | max | reps "
              "| × vLLM eager | × vLLM compiled | × nnsight batched | × nnsight serial "
              "| × own plain fwd | s per request | dtype |")
    # Markdown renders a table only if the delimiter row has as many cells as the header.
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        q = ratios(r, rows)
        unit = "tok/s" if r["metric"] == "tokens_per_s" else (
            "per call" if r["workload"] == "trace_overhead" else "wall")
        lines.append(
            f"| {r['workload']} | {r['case']} | {r['system']} | {r['variant']} | {unit} "
            f"| {_fmt_value(r, r['median'])} | {_fmt_value(r, r['min'])} "
            f"| {_fmt_value(r, r['max'])} | {r['reps']} | {_fmt_ratio(q['vllm_eager'])} "
            f"| {_fmt_ratio(q['vllm_compiled'])} | {_fmt_ratio(q['nnsight'])} "
            f"| {_fmt_ratio(q['nnsight_serial'])} | {_fmt_ratio(q['own_plain_forward'])} "
            f"| {_per_request(r)} | {r.get('dtype')} |")
    return lines


def targets(result: dict[str, Any]) -> list[str]:
    """Issue 3/4/5 targets against this run (informational; never asserted in tests)."""
    rows = result["rows"]
    ran = result.get("workloads")  # a run's targets are those of the workloads it ran
    out = ["| target | system | measured | met |", "|---|---|---|---|"]

    def add(label: str, system: str, workload: str, case: str, key: str, bound: float,
            higher: bool = True, variant: tuple[str, ...] | None = None) -> None:
        if ran is not None and workload not in ran:
            return
        r = _find(rows, system, workload, case, variant)
        base = baselines(r, rows)[key] if r else None
        xs = paired(r, base, key) if base else []
        if not xs:
            out.append(f"| {label} | {system} | not measured | |")
            return
        out.append(f"| {label} | {system} | {spread(xs)} | {verdict(xs, bound, higher)} |")

    for base in ("vllm_eager", "vllm_compiled"):
        add(f"1c distinct vector, 1 layer ≥ 0.95× plain ({base})", "vinterp_vllm",
            "steer_generate", "distinct_1layer", base, 0.95)
        add(f"1d distinct vectors, all layers ≥ 0.8× plain ({base})", "vinterp_vllm",
            "steer_generate", "distinct_all_layers", base, 0.8)
        add(f"1e the same as `output[:] += v` ≥ 0.9× plain ({base})", "vinterp_vllm",
            "steer_generate", "idiom_all_layers", base, 0.9)
        add(f"2 last-token capture, all layers ≥ 0.8× plain prefill ({base})", "vinterp_vllm",
            "capture", "last_all_layers", base, 0.8)
    # issue 11: the plugin inside vLLM's compiled mode, against plain vLLM compiled (the eager
    # plugin's rows show the gap compiled mode closes)
    present = {r["system"] for r in rows}
    for sys_ in [s for s in ("vinterp_vllm", "vinterp_vllm_tables", "vinterp_vllm_eager")
                 if s in present]:
        c = "vllm_compiled"
        add("11 1c distinct vector, 1 layer ≥ 0.95× plain compiled", sys_, "steer_generate",
            "distinct_1layer", c, 0.95)
        add("11 1d all layers ≥ 0.85× plain compiled", sys_, "steer_generate",
            "distinct_all_layers", c, 0.85)
        add("11 last-token capture, 30 layers ≥ 0.85× plain compiled prefill", sys_, "capture",
            "last_all_layers", c, 0.85)
        add("11 many users ≥ 0.9× plain compiled", sys_, "many_users", "steered", c, 0.9)
        for level in ("c1", "c4", "c16"):
            add(f"11 concurrency {level[1:]} ≥ 0.9× plain compiled", sys_, "concurrency", level,
                c, 0.9)
    for sys_ in ("vinterp_vllm", "vinterp_hf"):
        add("1c ≥ 10× nnsight one at a time", sys_, "steer_generate", "distinct_1layer",
            "nnsight_serial", 10)
        add("1c ≥ 1× nnsight invokes", sys_, "steer_generate", "distinct_1layer", "nnsight", 1)
        add("4 ≥ 10× nnsight one at a time", sys_, "many_users", "steered", "nnsight_serial", 10)
        add("4 ≥ 1× nnsight invokes", sys_, "many_users", "steered", "nnsight", 1)
        add("3 ≥ 4× nnsight seed loop", sys_, "patch_sweep", "grid", "nnsight_serial", 4,
            variant=("one_batch",))
        add("3 ≥ 1× nnsight invokes per layer", sys_, "patch_sweep", "grid", "nnsight", 1,
            variant=("one_batch",))
        add("3 written as nnsight users write it ≥ 1.5× nnsight invokes per layer", sys_,
            "patch_sweep", "grid", "nnsight", 1.5, variant=("nnsight_idiom",))
    add("5 12-save trace ≤ 1.1× plain forward", "vinterp_hf", "trace_overhead", "save_12",
        "own_plain_forward", 1.1, higher=False)
    r_v = _find(rows, "vinterp_hf", "trace_overhead", "save_12")
    r_n = _find(rows, "nnsight", "trace_overhead", "save_12")
    b_v = _find(rows, "vinterp_hf", "trace_overhead", "plain_forward")
    b_n = _find(rows, "nnsight", "trace_overhead", "plain_forward")
    if r_v and r_n and b_v and b_n:
        ov_v = dict(zip(sorted(set(_by_rep(r_v)) & set(_by_rep(b_v))),
                        paired(r_v, b_v, "own_plain_forward"), strict=True))
        ov_n = dict(zip(sorted(set(_by_rep(r_n)) & set(_by_rep(b_n))),
                        paired(r_n, b_n, "own_plain_forward"), strict=True))
        both = sorted(set(ov_v) & set(ov_n))
        if both:   # each repetition's overhead against nnsight's in the same repetition
            diff = [ov_v[k] / ov_n[k] for k in both]
            out.append(f"| 5 12-save overhead below nnsight's | vinterp_hf | "
                       f"{spread([ov_v[k] for k in both])} vs nnsight "
                       f"{spread([ov_n[k] for k in both])}; ratio {spread(diff)} "
                       f"| {verdict(diff, 1.0, higher=False)} |")
    return out


def overhead_table(result: dict[str, Any]) -> list[str]:
    """Trace overhead as paired ratios: each repetition's trace time over the plain forward
    of the same worker in the same repetition, with their spread."""
    rows = result["rows"]
    out = ["| system | case | × own plain forward, paired: median (min–max) | reading |",
           "|---|---|---|---|"]
    for r in rows:
        if r["workload"] != "trace_overhead" or r["case"] == "plain_forward":
            continue
        base = _find(rows, r["system"], "trace_overhead", "plain_forward")
        xs = paired(r, base, "own_plain_forward") if base else []
        if not xs:
            continue
        if min(xs) > 1.0:
            reading = "slower than a plain forward in every repetition"
        elif max(xs) < 1.0:
            reading = "faster than a plain forward in every repetition (noise or caching)"
        else:
            reading = "within noise of a plain forward"
        out.append(f"| {r['system']} | {r['case']} | {spread(xs)} | {reading} |")
    return out if len(out) > 2 else []


def checked(row: dict[str, Any]) -> bool:
    """Whether ``benchmarks/verify.py`` checks rows of this kind (token counts, steering,
    captures); patch sweeps, trace overhead and plain vLLM's prefill it does not."""
    w = row["workload"]
    return w in ("steer_generate", "concurrency", "many_users") or (
        w == "capture" and row["case"] != "prefill")


# Commits whose changes a run's JSON does not record in older runs (git log of benchmarks/).
VERIFY_COMMIT = "ed15835 (2026-11-27 11:40)"     # verification, rotation, steer_scale 4 -> 64
COMPILED_COMMIT = "0a6ab96 (2026-11-27 13:43)"   # the vLLM plugin's compiled mode
_COMPILED_DATE = "2026-11-27T13:43"


def engine_mode(info: dict[str, Any]) -> str | None:
    """A vLLM-side system's engine mode from its worker's info (None: not a vLLM engine, or
    not recorded)."""
    if "enforce_eager" not in info or info.get("backend", "vllm") != "vllm":
        return None
    return ("eager" if info["enforce_eager"] else "compiled") + (
        f", graph_points {info['graph_points']}" if info.get("graph_points") else "")


def provenance(result: dict[str, Any]) -> list[str]:
    """What the run checked and ran with: verified rows out of all, the steering norm, the
    engine modes; and, for runs from before these were recorded, what the code was then."""
    rows, out = result["rows"], []
    n, k = len(rows), sum(1 for r in rows if r.get("verified"))
    n_checked = sum(1 for r in rows if checked(r))
    unchecked = n - n_checked
    before_verify = "system_order" not in result   # rotation and verification came together
    steers = bool({"steer_generate", "concurrency", "many_users"} & set(result["workloads"]))
    if before_verify:
        out.append(
            f"- **verified 0/{n} rows: run before verification existed** (commit "
            f"{VERIFY_COMMIT}): no repetition's output was checked"
            + (", steering strength 4 (steer_scale 4.0, which the first verified run found "
               "changed no token of 8 requests: its steering rows may not have steered at all)"
               if steers else "")
            + ", and the same system order in every repetition")
    else:
        out.append(f"- verified {k}/{n} rows (every repetition of a verified row passed "
                   f"benchmarks/verify.py)" + (
                       f"; {unchecked} rows are of kinds verify.py does not check (patch "
                       f"sweeps, trace overhead, plain vLLM's prefill)" if unchecked else ""))
        scale = result.get("steer_scale")
        if steers:
            out.append(f"- steering vectors of norm {scale if scale is not None else 64.0}, "
                       f"seed {result.get('seed', 0)}"
                       + ("" if scale is not None else
                          " (not recorded in this JSON: 64 since commit "
                          f"{VERIFY_COMMIT})"))
    modes = dict(result.get("engine_modes") or {})
    for s, i in result["systems"].items():
        if s not in modes and engine_mode(i):
            modes[s] = engine_mode(i)
    old_plugin = [s for s, i in result["systems"].items()
                  if s.startswith("vinterp_vllm") and "enforce_eager" not in i
                  and result["date"] < _COMPILED_DATE]
    for s in old_plugin:
        modes[s] = (f"**eager** (the eager-only plugin; not recorded in this JSON: the plugin "
                    f"had no compiled mode before commit {COMPILED_COMMIT})")
    if modes:
        out.append("- vLLM engine modes: " + "; ".join(f"{s} {m}" for s, m in modes.items()))
    return out


_RATIO_NOTE = (
    "Ratios are speed ratios within one run (> 1 = faster than the baseline): tokens/s over "
    "the baseline's tokens/s, or the baseline's wall time over this row's. Plain vLLM cannot "
    "intervene, so its baseline is the same engine on the same prompts with no intervention "
    "(prefill only for capture). \"× own plain fwd\" is a trace's time over a plain "
    "`model(ids)` forward in the same process (lower is better). The table's ratio columns "
    "are ratios of medians (a row's median over its baseline's); targets and the "
    "trace-overhead table are paired: the median of each repetition's ratio to the baseline "
    "in the same repetition. The two can differ by a few percent.")


def section(result: dict[str, Any], h: str = "##") -> list[str]:
    """One run's report: machine, versions, table, targets, skipped (``h``: heading level)."""
    m = result["machine"]
    lines = [
        f"- date: {result['date']}; model: {result['model']}; HF-side systems on "
        f"{result.get('device', 'cpu')}; wall time {result['wall_s']:.0f} s "
        f"(target: {'5' if result['quick'] else '30'} min on 2 CPU cores)",
        f"- workloads: {', '.join(result['workloads'])}; systems: {', '.join(result['systems'])}",
        f"- machine: {m.get('cpu', '?')}, {m.get('cpu_count')} CPUs"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; {m.get('platform')}",
        f"- load average (1/5/15 min) at start {m.get('loadavg_at_start')}, at end "
        f"{m.get('loadavg')}: anything above 0 is other work sharing these cores",
        f"- repetitions: {result['reps']} timed, interleaved across systems, after one "
        "untimed warm-up each on tiny inputs"
        + (" — **--quick run: smaller sizes and fewer repetitions**" if result["quick"] else ""),
        f"- threads per worker: {result.get('threads')}; sizes: {result['sizes']}",
        *provenance(result),
        *([f"- note: {result['note']}"] if result.get("note") else []),
        "",
        f"{h} Versions",
        "",
    ]
    for name, info in result["systems"].items():
        vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
        lines.append(f"- {name}: {vers}; dtype {info.get('dtype')}")
    lines += ["", f"{h} Results", ""] + table(result)
    overhead = overhead_table(result)
    if overhead:
        lines += ["", f"{h} Trace overhead, paired by repetition", ""] + overhead
    lines += ["", f"{h} Targets (issues 3, 4, 5)", "",
              "Measured as paired ratios: each repetition against the baseline's value from "
              "the same repetition, median (min–max). 'within noise' when some repetitions "
              "meet the target and others do not.", ""] + targets(result)
    if result["skipped"]:
        lines += ["", f"{h} Skipped", ""]
        lines += [f"- {s['system']} {s['what']}: {s['reason'][:400]}" for s in result["skipped"]]
    return lines


_HEAD = ["# Benchmark results", "",
         "Generated by `python -m benchmarks` from the results JSON; do not edit by hand.",
         "See benchmarks/README.md for what each workload measures.", ""]


def write_report(result: dict[str, Any], report_dir: Path) -> None:
    """RESULTS.md and results.png in ``report_dir`` for one run."""
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = _HEAD + [_RATIO_NOTE, ""] + section(result)
    (report_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    _plot_quietly(result, report_dir / "results.png")


def write_combined(results: list[tuple[str, dict[str, Any]]], report_dir: Path,
                   note: str = "") -> None:
    """RESULTS.md for several runs, one section each (ratios never cross runs); the plot is
    drawn from the first run that has the concurrency sweep.

    Example: ``python -m benchmarks report results/a.json results/b.json``.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = _HEAD + [_RATIO_NOTE, ""] + ([note, ""] if note else [])
    for k, (name, result) in enumerate(results, 1):
        if result.get("kind") == "server":   # benchmarks/server_load.py's own format
            from benchmarks.server_load import server_section

            body = server_section(result)
        elif result.get("kind") == "steering_eval":   # benchmarks/steering_eval.py's
            from benchmarks.steering_eval import steering_section

            body = steering_section(result)
        else:
            body = section(result, "###")
        lines += [f"## Run {k} of {len(results)}: {', '.join(result['workloads'])} "
                  f"(`{name}`)", ""] + body + [""]
    (report_dir / "RESULTS.md").write_text("\n".join(lines))
    with_sweep = [r for _, r in results if "concurrency" in r["workloads"]]
    # (server and steering_eval runs have their own formats, no benchmark rows to plot)
    plottable = with_sweep or [r for _, r in results if isinstance(r.get("rows"), list)]
    if plottable:
        _plot_quietly(plottable[0], report_dir / "results.png")


def _plot_quietly(result: dict[str, Any], path: Path) -> None:
    try:
        plot(result, path)
    except ImportError:  # matplotlib missing: the table is the result, the plot a view of it
        pass


def concurrency_curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(system, variant) -> requests in flight -> row, for the throughput-vs-concurrency plot.

    Points: the concurrency sweep (``c1``, ``c4``, ...), its top level from steered generation
    (1c, or plain vLLM's unsteered run), and nnsight one request at a time as concurrency 1 of
    its own curve (variant ``serial``: nnsight's ``c1`` invokes row is another point at 1).
    """
    curves: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r["metric"] != "tokens_per_s":
            continue
        if r["workload"] == "concurrency":
            n, variant = int(r["case"][1:]), r["variant"]
        elif r["workload"] == "steer_generate" and r["case"] in ("distinct_1layer", "none"):
            if r["case"] == "none" and not r["system"].startswith("vllm_"):
                continue
            n = 1 if r["variant"] == "one_at_a_time" else r["items"]
            variant = "serial" if r["variant"] == "one_at_a_time" else r["variant"]
        else:
            continue
        curves.setdefault((r["system"], variant), {})[n] = r
    return curves


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency (requests in flight) and every row's speed ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    for (system, variant), pts in sorted(concurrency_curves(rows).items()):
        xs = sorted(pts)
        ax1.errorbar(xs, [pts[x]["median"] for x in xs],
                     yerr=[[pts[x]["median"] - pts[x]["min"] for x in xs],
                           [pts[x]["max"] - pts[x]["median"] for x in xs]],
                     marker="o", capsize=3, label=f"{system} ({variant})")
    ax1.legend(fontsize=7)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("requests in flight")
    ax1.set_ylabel("tokens/s (median, min–max)")
    ax1.set_title("Steered generation (a distinct vector per request): throughput vs "
                  "concurrency", fontsize=9)
    labels, vals_v, vals_n = [], [], []
    for r in rows:
        q = ratios(r, rows)
        if q["vllm_eager"] is None and q["nnsight"] is None:
            continue
        labels.append(f"{r['workload']}/{r['case']}/{r['system']}/{r['variant']}")
        vals_v.append(q["vllm_eager"] or 0.0)
        vals_n.append(q["nnsight"] or 0.0)
    y = range(len(labels))
    ax2.barh([i - 0.2 for i in y], vals_v, height=0.4, label="× plain vLLM eager")
    ax2.barh([i + 0.2 for i in y], vals_n, height=0.4, label="× nnsight batched")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_yticks(list(y), labels, fontsize=6)
    ax2.set_xscale("log")
    ax2.set_title("Speed ratios (log scale, > 1 = faster)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"vinterp benchmarks, {result['model']}, {result['date']}"
                 + (" (quick)" if result["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
