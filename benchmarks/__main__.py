"""``python -m benchmarks run [--quick] [--only WORKLOAD ...] [--systems NAME ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmarks and regenerate RESULTS.md")
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
                   help="where the JSON (and, when given, RESULTS.md and the plot) go; "
                        "default benchmarks/results with RESULTS.md in benchmarks/ "
                        "(env VINTERP_BENCH_RESULTS_DIR)")
    r.add_argument("--device", default="cpu",
                   help="where HF-side systems (vinterp_hf, nnsight, hf_hooks) run: cpu or "
                        "cuda (vLLM picks its own platform)")
    r.add_argument("--model-path", type=Path,
                   help="a local model directory to use instead of smollm2-135m (e.g. the "
                        "same config with random weights where the weights are unavailable)")
    args = p.parse_args(argv)

    from benchmarks.runner import run

    results_dir = Path(args.results_dir) if args.results_dir else HERE / "results"
    report_dir = Path(args.results_dir) if args.results_dir else HERE
    run(args.quick, args.only, args.systems, args.reps, results_dir, report_dir,
        args.threads, device=args.device, model_path=args.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
