"""The ``steering_eval`` workload (issue 12): a layer x scale steering sweep as one batch on the
vllm backend, against the same sweep with nnsight ``generate``.

The sweep: ``--layers`` layers x ``--scales`` scales x ``--prompts`` neutral prompts x
``--tokens`` greedy tokens (full size 10 x 9 x 50 x 32 = 4,500 generations), each generation
steered at its cell's layer by ``scale * v`` at every step (``v`` a fixed random direction,
norm ``--norm``). Arms:

* ``vinterp_one_batch``: the whole grid as one ``generate`` trace with an invoke per
  (cell, prompt), as ``vinterp.evals.sweep`` submits it (vllm backend, eager, float32);
* ``nnsight_looped``: nnsight 0.8.1, one ``generate`` per generation, looped cell by cell
  (target: vinterp >= 10x);
* ``nnsight_per_cell``: nnsight, one ``generate`` per cell with an invoke per prompt
  (target: vinterp >= 2x);
* ``vinterp_cell_by_cell`` (``--cell-by-cell``, optional): vinterp with one trace per cell.

The nnsight arms run in ``.bench-venv`` (``make bench-setup``; module
``benchmarks.steering_eval_nnsight``). At full size they would take hours on 2 CPU cores, so
they time ``--nnsight-cells`` cells drawn at random from the grid (seeded) and the full
sweep's wall time is **extrapolated** from their mean seconds per cell (every cell has the same
prompts and token count); the result says so and from how many cells. Tokens are counted
from the outputs (every generation must reach ``--tokens``), and the sampled cells'
tokens are compared between vinterp and nnsight.

Writes ``benchmarks/results/steering-eval/<date>-<host>.json`` (``--out``) and prints the
Markdown section that ``python -m benchmarks report`` puts into RESULTS.md. Example::

    .venv/bin/python -m benchmarks.steering_eval                       # full size
    .venv/bin/python -m benchmarks.steering_eval --layers 2 --scales 3 --prompts 8 \\
        --tokens 16 --nnsight-cells 2 --out /tmp/se
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NNSIGHT_PY = Path(os.environ.get("VINTERP_BENCH_NNSIGHT_PYTHON")
                  or REPO / ".bench-venv" / "bin" / "python")
TARGETS = {"nnsight_looped": 10.0, "nnsight_per_cell": 2.0}


def grid(n_layers: int, n_scales: int, num_hidden: int) -> list[tuple[int, float]]:
    """The sweep's cells: ``n_layers`` evenly spaced layers x ``n_scales`` scales in
    [-1.5, 1.5] (scales of a norm-``--norm`` vector).

    Example: ``grid(2, 3, 30)`` -> ``[(10, -1.5), (10, 0.0), (10, 1.5), (20, -1.5), ...]``.
    """
    step = max(1, num_hidden // (n_layers + 1))
    layers = [step * (i + 1) for i in range(n_layers)]
    scales = [round(-1.5 + 3.0 * i / max(1, n_scales - 1), 6) for i in range(n_scales)]
    return [(la, s) for la in layers for s in scales]


def _vinterp_run(model: Any, vec: Any, cells: list[tuple[int, float]], prompts: list[str],
                 tokens: int, per_cell: bool) -> tuple[float, list[list[int]]]:
    """vinterp: the cells as one trace (or one trace per cell); (seconds, new ids)."""
    groups = [[c] for c in cells] if per_cell else [cells]
    lens = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for group in groups:
        with model.generate(max_new_tokens=tokens, do_sample=False, ignore_eos=True) as tr:
            for layer, scale in group:
                for p in prompts:
                    with tr.invoke(p):
                        with tr.all():
                            model.layers[layer].output.steer(vec, scale=scale)
        res = [r.tolist() for r in tr.result]
        out += [r[n:] for r, n in zip(res, lens * len(group), strict=True)]
    return time.perf_counter() - t0, out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def extrapolate(cell_seconds: list[float], n_cells: int, tokens_per_cell: int
                ) -> dict[str, Any]:
    """The full sweep's time from the seconds of a few timed cells (all cells alike): mean
    seconds per cell x ``n_cells``, with the range from the fastest and slowest cell; tokens/s
    as measured on the timed cells.

    Example: ``extrapolate([10.0, 14.0], 90, 1600)`` -> ``seconds`` 1080, ``seconds_min``
    900, ``seconds_max`` 1260, ``tok_s`` 133.3.
    """
    mean = statistics.fmean(cell_seconds)
    return {"seconds": mean * n_cells, "seconds_min": min(cell_seconds) * n_cells,
            "seconds_max": max(cell_seconds) * n_cells, "tok_s": tokens_per_cell / mean,
            "extrapolated": True, "cells_timed": len(cell_seconds),
            "cell_seconds": list(cell_seconds)}


def add_speedups(arms: dict[str, dict[str, Any]], base: str = "vinterp_one_batch") -> None:
    """Each other arm's ``speedup`` (its seconds over ``base``'s) and, for extrapolated arms,
    ``speedup_range`` from the fastest and slowest timed cell.

    Example: base 100 s, an arm of 1080 s (900-1260) -> 10.8x (9.0-12.6).
    """
    t = arms[base]["seconds"]
    for k, a in arms.items():
        if k != base:
            a["speedup"] = a["seconds"] / t
            if "seconds_min" in a:
                a["speedup_range"] = [a["seconds_min"] / t, a["seconds_max"] / t]


def _nnsight(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    if not NNSIGHT_PY.exists():
        raise RuntimeError(f"no nnsight interpreter at {NNSIGHT_PY}: run `make bench-setup`")
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run([str(NNSIGHT_PY), "-m", "benchmarks.steering_eval_nnsight",
                    str(tmp / "spec.json"), str(tmp / "nnsight.json")], cwd=REPO, check=True)
    return json.loads((tmp / "nnsight.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--scales", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--norm", type=float, default=20.0, help="the steering vector's norm")
    ap.add_argument("--nnsight-cells", type=int, default=4,
                    help="cells the nnsight arms time (0: leave nnsight out)")
    ap.add_argument("--arms", nargs="+", default=["looped", "per_cell"],
                    choices=["looped", "per_cell"], help="nnsight arms")
    ap.add_argument("--cell-by-cell", action="store_true",
                    help="also time vinterp with one trace per cell (full grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line stored with the result")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "steering-eval")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    import vinterp
    from vinterp import LanguageModel
    from vinterp.models.registry import resolve_model
    from vinterp.steering.datasets import neutral_prompts

    load_start, t_all = _load(), time.perf_counter()
    model_path = str(resolve_model(args.model))
    model = LanguageModel(args.model, backend="vllm", max_model_len=512)
    prompts = (neutral_prompts() * 10)[:args.prompts]
    cells = grid(args.layers, args.scales, model.config.num_hidden_layers)
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm() * args.norm
    n_gen, n_tok = len(cells) * len(prompts), len(cells) * len(prompts) * args.tokens
    res: dict[str, Any] = {
        "kind": "steering_eval", "workloads": ["steering_eval"], "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
        "cpus": os.cpu_count(), "layers": args.layers, "scales": args.scales,
        "cells": len(cells), "prompts": len(prompts), "tokens": args.tokens,
        "generations": n_gen, "generated_tokens": n_tok, "vector_norm": args.norm,
        "note": args.note, "vinterp_vllm_mode": "eager" if os.environ.get(
            "VINTERP_VLLM_EAGER", "") not in ("", "0") else "compiled",
        "versions": {"vinterp": getattr(vinterp, "__version__", "?"),
                     "torch": torch.__version__}}
    try:
        import vllm
        res["versions"]["vllm"] = vllm.__version__
    except ImportError:
        pass
    _vinterp_run(model, vec, cells[:1], prompts[:2], 2, per_cell=False)     # warm-up
    arms: dict[str, Any] = {}
    t, ids = _vinterp_run(model, vec, cells, prompts, args.tokens, per_cell=False)
    done = sum(min(len(x), args.tokens) for x in ids)
    if done != n_tok:
        raise RuntimeError(f"vinterp generated {done} of {n_tok} tokens")
    arms["vinterp_one_batch"] = {"seconds": t, "tok_s": n_tok / t, "extrapolated": False,
                                 "load_after": _load()}
    print(f"vinterp one batch: {t:.1f} s, {n_tok / t:.1f} tok/s", file=sys.stderr)
    if args.cell_by_cell:
        t2, ids2 = _vinterp_run(model, vec, cells, prompts, args.tokens, per_cell=True)
        arms["vinterp_cell_by_cell"] = {"seconds": t2, "tok_s": n_tok / t2,
                                        "extrapolated": False, "same_tokens": ids2 == ids,
                                        "load_after": _load()}
    if args.nnsight_cells > 0:
        sample = sorted(random.Random(args.seed).sample(range(len(cells)),
                                                        min(args.nnsight_cells, len(cells))))
        with tempfile.TemporaryDirectory(prefix="vinterp-steer-bench-") as tmp:
            torch.save(vec, Path(tmp) / "vec.pt")
            nn = _nnsight({"model_path": model_path, "prompts": prompts,
                           "tokens": args.tokens, "vector": str(Path(tmp) / "vec.pt"),
                           "cells": [list(cells[i]) for i in sample], "arms": args.arms},
                          Path(tmp))
        res["versions"]["nnsight_venv"] = nn["versions"]
        per_tok = len(prompts) * args.tokens
        for arm, rows in nn["arms"].items():
            short = [n for r in rows for n in r["new_tokens"] if n < args.tokens]
            if short:
                raise RuntimeError(f"nnsight {arm}: {len(short)} generations stopped early")
            same = [a == b for i, r in zip(sample, rows, strict=True)
                    for a, b in zip(ids[i * len(prompts):(i + 1) * len(prompts)], r["ids"],
                                    strict=True)]
            arms[f"nnsight_{arm}"] = {
                **extrapolate([r["seconds"] for r in rows], len(cells), per_tok),
                "cells": [[r["layer"], r["scale"]] for r in rows],
                "same_tokens_as_vinterp": f"{sum(same)}/{len(same)}", "load_after": _load()}
    add_speedups(arms)
    res.update(arms=arms, load_start=load_start, load_end=_load(),
               wall_s=time.perf_counter() - t_all)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y-%m-%d-%H%M')}-{platform.node()}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(steering_section(res)))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def steering_section(result: dict[str, Any]) -> list[str]:
    """A steering_eval run as Markdown (for RESULTS.md): arms, wall time, tokens/s, targets.

    Example: ``"\\n".join(steering_section(json.loads(Path(run).read_text())))``.
    """
    r, arms = result, result["arms"]
    lines = [f"- date: {r['date']}; model: {r['model']}; {r['cpus']} CPUs; load average "
             f"(1/5/15 min) at start {r['load_start']}, at end {r['load_end']}"
             + (" — the machine was shared with other work during this run"
                if max(r["load_start"][0], r["load_end"][0]) > 1.5 else ""),
             f"- sweep: {r['layers']} layers × {r['scales']} scales × {r['prompts']} prompts "
             f"× {r['tokens']} greedy tokens = {r['generations']:,} generations, "
             f"{r['generated_tokens']:,} generated tokens (counted from the outputs); each "
             f"generation steered at its cell's layer, every step, by scale × a fixed random "
             f"vector of norm {r['vector_norm']:g}; float32 everywhere; vinterp's vllm "
             f"backend {r.get('vinterp_vllm_mode', 'eager')} (its default), engine start and "
             f"warm-up untimed; nnsight 0.8.1 on transformers in its own venv",
             f"- versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
             *([f"- note: {r['note']}"] if r.get("note") else []), "",
             "| arm | how | wall time (full sweep) | tok/s | vinterp speedup | target | met |",
             "|---|---|---|---|---|---|---|"]
    how = {"vinterp_one_batch": "vllm backend, the whole grid as one generate trace",
           "vinterp_cell_by_cell": "vllm backend, one generate trace per cell",
           "nnsight_looped": "nnsight generate per generation, looped cell by cell",
           "nnsight_per_cell": "nnsight generate per cell, an invoke per prompt"}
    for k, a in arms.items():
        wall = f"{a['seconds']:.0f} s"
        if a.get("extrapolated"):
            wall = (f"**{a['seconds']:.0f} s extrapolated** from {a['cells_timed']} of "
                    f"{r['cells']} cells ({a['seconds_min']:.0f}–{a['seconds_max']:.0f} s "
                    f"by the fastest/slowest cell)")
        sp = ""
        if "speedup" in a:
            sp = f"{a['speedup']:.1f}×"
            if "speedup_range" in a:
                sp += f" ({a['speedup_range'][0]:.1f}–{a['speedup_range'][1]:.1f})"
        target = TARGETS.get(k)
        met = ""
        if target is not None:
            lo, hi = a.get("speedup_range", [a["speedup"]] * 2)
            met = "yes" if lo >= target else ("no" if hi < target else "within range")
        lines.append(f"| {k} | {how.get(k, '')} | {wall} | {a['tok_s']:.1f} | {sp} "
                     f"| {'' if target is None else f'≥ {target:g}×'} | {met} |")
    ext = {k: a for k, a in arms.items() if a.get("extrapolated")}
    if ext:
        timed = "; ".join(f"{k} {a['cells_timed']} cells (" + ", ".join(
            f"L{c[0]}/{c[1]:+g}" for c in a["cells"]) + ")" for k, a in ext.items())
        lines += ["", f"nnsight rows are **extrapolated**: each arm timed cells drawn at random "
                  f"from the grid ({timed}; every cell has the same prompts and token count), "
                  f"and the full sweep's time is their mean seconds per cell × {r['cells']} "
                  f"cells; tok/s is measured on those cells."]
        same = [f"{k} {a['same_tokens_as_vinterp']}" for k, a in ext.items()
                if "same_tokens_as_vinterp" in a]
        if same:
            lines[-1] += (" Greedy tokens identical to vinterp's on those cells: "
                          + ", ".join(same) + " generations (HF vs vLLM float32 kernels can "
                          "differ in a late token).")
    return lines


if __name__ == "__main__":
    sys.exit(main())
