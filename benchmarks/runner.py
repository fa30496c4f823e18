"""The driver: starts one worker per system, interleaves repetitions, writes the results.

Each system runs in its own process (vLLM engines, the nnsight venv and HF never share one)
and loads the model once; the driver then walks repetitions round-robin across systems, so
slow drift of the machine (thermal, other load) spreads over all systems instead of biasing one.
The order of the systems rotates by one place from one repetition to the next, so no system
always runs first; a rotation keeps who follows whom, so each system runs right after the same
predecessor in every repetition (except the one where it runs first), and whatever that
predecessor leaves behind (warm caches, memory churn) always comes from the same system. Every
repetition's output is checked (``benchmarks/verify.py``) before its time counts.

A run writes only into its own directory under the results directory; the curated
``benchmarks/RESULTS.md`` changes only through ``python -m benchmarks report RUN.json ...``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TextIO

from benchmarks import report
from benchmarks.systems import (
    BENCH_VENV_SYSTEMS,
    PLAIN_VLLM_SYSTEMS,
    SYSTEM_WORKLOADS,
    SYSTEMS,
)
from benchmarks.verify import check, expected_captures, requested_tokens
from benchmarks.workloads import WORKLOADS, SizeConfig, WorkloadConfig, build_config

REPO = Path(__file__).resolve().parent.parent
# nnsight's interpreter: .bench-venv's (make bench-setup), or VINTERP_BENCH_NNSIGHT_PYTHON where
# nnsight is installed some other way (e.g. into the system Python of an offline GPU machine).
BENCH_VENV_PY = Path(os.environ.get("VINTERP_BENCH_NNSIGHT_PYTHON")
                     or REPO / ".bench-venv" / "bin" / "python")
# vLLM compiles on start (minutes of torch.compile on 2 CPU cores): left out of --quick.
QUICK_EXCLUDED = {"vllm_compiled": "left out of --quick (torch.compile start-up time)"}


def plain_vllm_plugins() -> str:
    """``VLLM_PLUGINS`` for plain vLLM: every installed general plugin except ours.

    vLLM loads a general plugin only if its name is in the comma-separated list (when the
    variable is set); an empty string would match no real name, but listing the others keeps
    vLLM's own plugins (LoRA resolvers) as in a stock install.
    """
    names = [ep.name for ep in entry_points(group="vllm.general_plugins") if ep.name != "vinterp"]
    return ",".join(names) if names else "none"


def worker_env(system: str, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        # The same thread count for every system. On a shared machine the default (one
        # thread per core) collapses: with other processes on the cores, OpenMP barriers wait
        # on descheduled threads (measured here: one forward 0.22 s with 1 thread, 6.6 s with 2).
        env["OMP_NUM_THREADS"] = str(threads)
        env["VINTERP_BENCH_THREADS"] = str(threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # In-process engine core: one process per system, and start-up drops from ~30 s to ~8 s.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # CUDA: keep the V1 runner the plugin hooks
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if system in PLAIN_VLLM_SYSTEMS:
        env["VLLM_PLUGINS"] = plain_vllm_plugins()
    return env


@dataclass
class Worker:
    """One system's worker process and its pipe."""

    system: str
    proc: subprocess.Popen
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    skip: str | None = None
    restarts: int = 0

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-1500:]
            why = " (SIGKILL: most likely the kernel's out-of-memory killer)" if code == -9 else ""
            return {"ok": False, "error": f"worker exited (code {code}){why}: ...{tail}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()


def start_worker(system: str, log_dir: Path, threads: int | None,
                 log_name: str | None = None) -> Worker | str:
    """Start a worker, or return why it cannot start."""
    python = sys.executable
    if system in BENCH_VENV_SYSTEMS:
        if not BENCH_VENV_PY.exists():
            return f"not available: {BENCH_VENV_PY} missing; run `make bench-setup`"
        python = str(BENCH_VENV_PY)
    log_path = log_dir / (log_name or f"{system}.log")
    log: TextIO = open(log_path, "w")  # noqa: SIM115 - lives as long as the worker
    proc = subprocess.Popen(
        [python, "-m", "benchmarks.worker", system], cwd=REPO, env=worker_env(system, threads),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
    )
    return Worker(system, proc, log_path)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            # Other processes on the machine skew timings: record the load.
                            "loadavg": list(os.getloadavg())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # the card, when run on a CUDA machine
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def make_config(sizes: SizeConfig, model_path: Path | None = None,
                device: str = "cpu") -> WorkloadConfig:
    from transformers import AutoConfig, AutoTokenizer

    from vinterp.models.registry import resolve_model

    path = str(model_path or resolve_model("smollm2-135m"))
    hf_cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return build_config(path, hf_cfg.num_hidden_layers, hf_cfg.hidden_size, sizes,
                        lambda text: len(tok(text)["input_ids"]), device=device)


def summarize(task: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-repetition values and their median/min/max.

    ``tokens_per_s``: tokens / seconds per repetition. ``seconds``: seconds per item (per call
    for trace_overhead, per request for one-at-a-time runs, per sweep for patch_sweep).
    """
    if task["metric"] == "tokens_per_s":
        values = [r["tokens"] / r["seconds"] for r in runs]
    else:
        values = [r["seconds"] / r["items"] for r in runs]
    row = dict(task)
    row.update(values=values, median=statistics.median(values), min=min(values),
               max=max(values), reps=len(values), tokens=runs[-1].get("tokens"),
               items=runs[-1]["items"],
               seconds_per_request=statistics.median(r["seconds"] / r["items"] for r in runs))
    # which repetition each value is from (pairs rows repetition by repetition in the report)
    row["rep_index"] = [r.get("rep", k) for k, r in enumerate(runs)]
    if any("verify" in r for r in runs):
        row["verified"] = len(runs)
        last = runs[-1].get("verify", {})
        if "changed" in last:
            row["changed"] = [last["changed"], last["compared"]]
    if "check" in runs[-1]:
        row["check"] = runs[-1]["check"]
    return row


def rotated(items: list[Any], rep: int) -> list[Any]:
    """``items`` starting at position ``rep`` (mod their number): each repetition of a
    workload starts with another system. A cyclic shift: every system keeps its predecessor
    (but for the repetition it runs first)."""
    if not items:
        return []
    k = rep % len(items)
    return items[k:] + items[:k]


def run(quick: bool, only: list[str] | None, systems: list[str] | None, reps: int | None,
        results_dir: Path, threads: int | None = None, *,
        device: str = "cpu", model_path: Path | None = None) -> Path:
    """Run the benchmark into a new directory under ``results_dir`` (the JSON, its own
    RESULTS.md and plot, worker logs); return the path of the results JSON."""
    sizes = SizeConfig.quick() if quick else SizeConfig()
    if reps:
        sizes.reps = reps
    workloads = [w for w in WORKLOADS if not only or w in only]
    wanted = systems or list(SYSTEMS)
    skipped: list[dict[str, str]] = []
    chosen = []
    for s in wanted:
        if not SYSTEM_WORKLOADS[s] & set(workloads):
            continue
        if quick and s in QUICK_EXCLUDED and not systems:
            skipped.append({"system": s, "what": "*", "reason": QUICK_EXCLUDED[s]})
            continue
        chosen.append(s)

    cfg = make_config(sizes, model_path, device)
    # Warm-ups run every task once on tiny inputs: first-call costs are paid there, and a full
    # run spends seconds, not a sixth of its time, warming up.
    warm_cfg = make_config(SizeConfig.warm(), model_path, device)
    now = dt.datetime.now()
    name = f"{now:%Y-%m-%d-%H%M%S}-{socket.gethostname()}{'-quick' if quick else ''}"
    run_dir = results_dir / name
    run_dir.mkdir(parents=True, exist_ok=False)   # never over an earlier run
    log_dir = run_dir / "logs"
    log_dir.mkdir()
    started = time.time()
    load_at_start = list(os.getloadavg())
    print(f"bench: systems {chosen}, workloads {workloads}, reps {sizes.reps}"
          f"{' (quick)' if quick else ''}", flush=True)

    setup_msg = {"op": "setup", "config": cfg.to_json(), "warm_config": warm_cfg.to_json()}
    workers: list[Worker] = []
    for s in chosen:
        w = start_worker(s, log_dir, threads)
        if isinstance(w, str):
            skipped.append({"system": s, "what": "*", "reason": w})
        else:
            w.send(setup_msg)
            workers.append(w)
    live: list[Worker] = []
    for w in workers:  # workers load in parallel; collect their answers in order
        r = w.recv()
        if r.get("ok"):
            w.info = r["info"]
            w.tasks = [t for t in r["tasks"] if t["workload"] in workloads]
            for what, reason in r.get("skipped", {}).items():
                skipped.append({"system": w.system, "what": what, "reason": reason})
            live.append(w)
            print(f"bench: {w.system} ready ({w.info.get('load_s', 0):.1f} s)", flush=True)
        else:
            reason = r.get("skip") or f"setup failed: {r.get('error')}"
            skipped.append({"system": w.system, "what": "*", "reason": reason})
            print(f"bench: {w.system} skipped: {reason[:300]}", flush=True)
            w.close()

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failed: set[tuple[str, str]] = set()
    orders: dict[str, list[list[str]]] = {}

    def revive(w: Worker, workload: str) -> None:
        """Start a worker that died (out of memory, crash) again, so that only the task that
        killed it is lost, not the rest of the run for that system; warm up the tasks of the
        current workload on it again."""
        if w.proc.poll() is None:
            return
        w.restarts += 1
        fresh = start_worker(w.system, log_dir, threads, f"{w.system}.restart{w.restarts}.log")
        if isinstance(fresh, str):
            return
        fresh.send(setup_msg)
        if not fresh.recv().get("ok"):
            fresh.close()
            return
        w.proc, w.log_path = fresh.proc, fresh.log_path
        print(f"bench: {w.system} worker restarted", flush=True)
        for t in w.tasks:
            if t["workload"] == workload:
                run_once(w, t, record=False)

    def run_once(w: Worker, t: dict[str, Any], record: bool, rep: int = -1) -> None:
        key = (w.system, f"{t['workload']}/{t['case']}/{t['variant']}")
        if key in failed:
            return
        try:
            w.send({"op": "run" if record else "warm", "task": t})
            r = w.recv()
        except OSError as e:  # the worker died earlier (crash, OOM): record, carry on
            r = {"ok": False, "error": f"worker gone: {e}"}
        if not r.get("ok"):
            reason = r.get("skip") or f"failed: {r.get('error')}"
            skipped.append({"system": w.system, "what": key[1], "reason": reason})
            failed.add(key)
            print(f"bench: {w.system} {key[1]}: {reason[:300]}", flush=True)
            revive(w, t["workload"])
            return
        if record:
            why = check(t, w.system, r["result"], requested=requested_tokens(cfg, t),
                        capture_count=expected_captures(cfg, t))
            if why:   # a repetition that did less (or other) work than asked never counts
                skipped.append({"system": w.system, "what": key[1],
                                "reason": f"verification failed in repetition {rep + 1}: {why}"})
                failed.add(key)
                runs.pop(key, None)
                print(f"bench: {w.system} {key[1]}: verification failed: {why}", flush=True)
                return
            runs.setdefault(key, []).append(dict(r["result"], rep=rep))

    try:
        for workload in workloads:
            # One untimed warm-up per task on small inputs (lazy init, first-call
            # compilation), then the timed repetitions, round-robin across systems.
            for rep in range(-1, sizes.reps):
                order = rotated(live, max(rep, 0))
                if rep >= 0:
                    orders.setdefault(workload, []).append([w.system for w in order])
                for w in order:
                    for t in w.tasks:
                        if t["workload"] == workload:
                            run_once(w, t, record=rep >= 0, rep=rep)
                print(f"bench: {workload} rep {rep + 1}/{sizes.reps} done "
                      f"({time.time() - started:.0f} s)", flush=True)
    finally:
        for w in live:
            w.close()

    rows = []
    info = {w.system: w.info for w in live}
    for w in live:
        for t in w.tasks:
            key = (w.system, f"{t['workload']}/{t['case']}/{t['variant']}")
            if key in runs and key not in failed:
                row = summarize(t, runs[key])
                row["system"] = w.system
                row["dtype"] = w.info.get("dtype")
                rows.append(row)

    result = {
        "schema": 1,
        "date": now.isoformat(timespec="seconds"),
        "quick": quick,
        "model": str(model_path) if model_path else "smollm2-135m",
        "device": device,
        "machine": machine_info() | {"loadavg_at_start": load_at_start},
        "sizes": cfg.sizes.__dict__ | {"capture_full_layers": list(cfg.sizes.capture_full_layers),
                                       "concurrency_levels": list(cfg.sizes.concurrency_levels)},
        "reps": sizes.reps,
        "threads": threads or "library default",
        "workloads": workloads,
        "systems": info,
        # what the rows ran with, so a JSON alone says it (older runs left these out)
        "steer_scale": cfg.steer_scale,
        "seed": cfg.seed,
        "engine_modes": {s: m for s, i in info.items() if (m := report.engine_mode(i))},
        "skipped": skipped,
        "rows": rows,
        "system_order": orders,
        "wall_s": time.time() - started,
    }
    out = run_dir / f"{name}.json"
    out.write_text(json.dumps(result, indent=1))
    report.write_report(result, run_dir)
    print(f"bench: wrote {out} and {run_dir / 'RESULTS.md'} in {result['wall_s']:.0f} s "
          f"(benchmarks/RESULTS.md is unchanged: `python -m benchmarks report` makes it)")
    return out
