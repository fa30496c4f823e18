"""``python -m benchmarks run [--quick] [--only WORKLOAD ...] [--systems NAME ...]`` (a new
directory under benchmarks/results/), and ``python -m benchmarks report RUN.json ...``
(benchmarks/RESULTS.md from the named runs: the only way it changes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmarks into a new directory under "
                                   "benchmarks/results/ (never touches benchmarks/RESULTS.md)")
    r.add_argument("--quick", action="store_true", help="small sizes, 2 reps (< 5 min)")
    r.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="WORKLOAD",
                   help=f"workloads to run: {', '.join(WORKLOADS)}")
    r.add_argument("--systems", nargs="+", choices=list(SYSTEMS), metavar="SYSTEM",
                   help=f"systems to run: {', '.join(SYSTEMS)}")
    r.add_argument("--reps", type=int, help="timed repetitions (default 5, --quick 2)")
    r.add_argument("--threads", type=int,
                   default=int(os.environ.get("VINTERP_BENCH_THREADS", 0)) or None,
                   help="torch/OpenMP threads per worker (default: library default, one per "
                        "core); use 1 on a machine shared with other work")
    r.add_argument("--results-dir", type=Path,
                   default=os.environ.get("VINTERP_BENCH_RESULTS_DIR"),
                   help="where the run's directory (JSON, its RESULTS.md and plot, logs) "
                        "goes; default benchmarks/results (env VINTERP_BENCH_RESULTS_DIR)")
    r.add_argument("--device", default="cpu",
                   help="where HF-side systems (vinterp_hf, nnsight, hf_hooks) run: cpu or "
                        "cuda (vLLM picks its own platform)")
    r.add_argument("--model-path", type=Path,
                   help="a local model directory to use instead of smollm2-135m (e.g. the "
                        "same config with random weights where the weights are unavailable)")
    rp = sub.add_parser("report", help="write RESULTS.md (and the plot) from results JSONs: "
                                       "one section per run, ratios within each run")
    rp.add_argument("files", nargs="+", type=Path, metavar="RESULTS.json")
    rp.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md goes "
                                                           "(default benchmarks/)")
    rp.add_argument("--note", default="", help="a paragraph put before the runs")
    args = p.parse_args(argv)

    if args.cmd == "report":
        from benchmarks import report

        results = [(str(f.resolve().relative_to(HERE) if f.resolve().is_relative_to(HERE) else f),
                    json.loads(f.read_text())) for f in args.files]
        if len(results) == 1:
            report.write_report(results[0][1], args.out)
        else:
            report.write_combined(results, args.out, args.note)
        print(f"bench: wrote {args.out / 'RESULTS.md'} from {len(results)} run(s)")
        return 0

    from benchmarks.runner import run

    results_dir = Path(args.results_dir) if args.results_dir else HERE / "results"
    run(args.quick, args.only, args.systems, args.reps, results_dir, args.threads,
        device=args.device, model_path=args.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
