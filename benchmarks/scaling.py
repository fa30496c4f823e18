"""The ``scaling`` workload: how vinterp's cost grows, next to plain vLLM on the same engine.

Three curves, each point timed against plain vLLM (same settings, compiled unless
``--eager``, no plugin hooks) in the same repetition, repetitions interleaved:

* **distinct vectors in flight** — ``--requests`` requests (all in one batch: ``max_num_seqs``
  is that many), each steering one layer with vector ``i % k`` for k = 1, 16, 64, 256, 1024:
  the same total tokens at every point. A per-slot design slows down as k grows (EasySteer
  falls to 0.18x at 256 configurations); a flat curve shows there is no slot limit.
* **layers steered** — a distinct vector per request at 1, 4, 16 and 30 layers.
* **layers captured** — prefill of ``--capture-prompts`` prompts saving 1, 4, 16 and 30
  layers' residual stream, last token and full sequence, against plain prefill.

Writes ``scaling.json``, ``scaling.md`` (tables) and ``scaling.png`` (the curves) under
``--out`` (default ``benchmarks/results/scaling/<date>-<host>[-quick]``).

Usage::

    .venv/bin/python -m benchmarks.scaling               # ~15 min on 2 idle CPU cores
    .venv/bin/python -m benchmarks.scaling --quick       # ~3 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import _sentence

DISTINCT = (1, 16, 64, 256, 1024)
LAYERS = (1, 4, 16, 30)


def _prompts(n: int, seed: int, words: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(*words)) for _ in range(n)]


def _vectors(n: int, hidden: int, norm: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, hidden, generator=g)
    return v / v.norm(dim=-1, keepdim=True) * norm


class Plain:
    """Plain vLLM: the engine settings vinterp uses, without the plugin's hooks."""

    def __init__(self, path: str, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        from vinterp.backends.vllm.engine import hf_classes_untouched

        with hf_classes_untouched(Path(path)):
            self.llm = LLM(model=path, dtype="float32", seed=0, **kwargs)

    def generate(self, prompts: list[str], tokens: int) -> int:
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def prefill(self, prompts: list[str]) -> int:
        from vllm import SamplingParams

        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        return sum(len(o.prompt_token_ids) for o in outs)


class Vinterp:
    """vinterp's vllm backend on the same settings."""

    def __init__(self, path: str, kwargs: dict[str, Any]) -> None:
        from vinterp import LanguageModel

        self.m = LanguageModel(path, backend="vllm", dtype=torch.float32, **kwargs)

    def steer(self, prompts: list[str], tokens: int, vecs: torch.Tensor, k: int,
              layers: list[int]) -> int:
        """Request ``i`` adds ``vecs[j, i % k]`` at layer ``layers[j]`` on every step."""
        m = self.m
        with m.generate(max_new_tokens=tokens, do_sample=False, ignore_eos=True) as tr:
            for i, p in enumerate(prompts):
                with tr.invoke(p):
                    with tr.all():
                        for j, layer in enumerate(layers):
                            m.layers[layer].output.steer(vecs[j, i % k])
        return sum(len(r) for r in tr.result) - sum(
            len(m.tokenizer(p)["input_ids"]) for p in prompts)

    def capture(self, prompts: list[str], layers: list[int], last: bool) -> int:
        m, saved = self.m, []
        with m.trace() as tr:
            for p in prompts:
                with tr.invoke(p):
                    for layer in layers:
                        out = m.layers[layer].output
                        saved.append((out[:, -1] if last else out).save())
        assert len(saved) == len(prompts) * len(layers)
        return sum(len(m.tokenizer(p)["input_ids"]) for p in prompts)


def _timed(fn: Any) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def _spread_layers(n: int, total: int) -> list[int]:
    return [round(i * (total - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [total // 2]


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vinterp.models.registry import resolve_model

    path = str(resolve_model(args.model))
    cfg = json.loads((Path(path) / "config.json").read_text())
    n_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    kwargs = {"enforce_eager": args.eager, "max_num_seqs": args.requests,
              "max_model_len": 256, "kv_cache_memory_bytes": 2 << 30}
    plain, vin = Plain(path, kwargs), Vinterp(path, kwargs)
    gen_prompts = _prompts(args.requests, 1, (3, 6))
    cap_prompts = _prompts(args.capture_prompts, 2, (6, 20))
    few = gen_prompts[:args.layer_requests]
    distinct_vecs = _vectors(max(DISTINCT), hidden, 64.0, 0).unsqueeze(0)
    layer_vecs = _vectors(max(LAYERS) * args.layer_requests, hidden, 64.0, 1).view(
        max(LAYERS), args.layer_requests, hidden)

    points: list[tuple[str, str, Any, Any]] = []   # (curve, x, vinterp call, plain call)
    mid = [n_layers // 2]
    for k in DISTINCT:
        if k <= args.requests:
            points.append(("distinct_vectors", str(k),
                           lambda k=k: vin.steer(gen_prompts, args.tokens, distinct_vecs, k, mid),
                           lambda: plain.generate(gen_prompts, args.tokens)))
    for n in LAYERS:
        layers = _spread_layers(min(n, n_layers), n_layers)
        points.append(("layers_steered", str(n),
                       lambda layers=layers: vin.steer(few, args.layer_tokens, layer_vecs,
                                                       args.layer_requests, layers),
                       lambda: plain.generate(few, args.layer_tokens)))
    for last in (True, False):
        for n in LAYERS:
            layers = _spread_layers(min(n, n_layers), n_layers)
            points.append(("captured_" + ("last_token" if last else "full_sequence"), str(n),
                           lambda layers=layers, last=last: vin.capture(cap_prompts, layers,
                                                                        last),
                           lambda: plain.prefill(cap_prompts)))
    # warm-up: every call once, untimed (first-call costs: tokenizers, graph caches)
    for _, _, v, p in points:
        v()
        p()
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(args.reps):
        order = points if rep % 2 == 0 else points[::-1]
        for curve, x, v, p in order:
            first, second = ((v, "vinterp"), (p, "plain")) if rep % 2 == 0 else \
                ((p, "plain"), (v, "vinterp"))
            got = {}
            for fn, name in (first, second):
                secs, n = _timed(fn)
                got[name] = n / secs
            samples.setdefault((curve, x), []).append(
                {"vinterp": got["vinterp"], "plain": got["plain"],
                 "ratio": got["vinterp"] / got["plain"]})
    rows = []
    for (curve, x), reps in samples.items():
        rows.append({"curve": curve, "x": x,
                     "vinterp_tok_s": statistics.median(r["vinterp"] for r in reps),
                     "plain_tok_s": statistics.median(r["plain"] for r in reps),
                     "ratio_median": statistics.median(r["ratio"] for r in reps),
                     "ratios": [r["ratio"] for r in reps]})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "model": args.model, "eager": args.eager,
            "requests": args.requests, "tokens": args.tokens,
            "layer_requests": args.layer_requests, "layer_tokens": args.layer_tokens,
            "capture_prompts": args.capture_prompts,
            "reps": args.reps, "load_avg": os.getloadavg(), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    mode = "eager" if result["eager"] else "compiled"
    lines = [f"Scaling ({result['model']}, float32, both engines {mode}; "
             f"{result['reps']} interleaved repetitions; load average at end "
             f"{result['load_avg'][0]:.2f}). Ratio = vinterp / plain vLLM tokens/s in the same "
             "repetition (median, then each repetition's). Sizes: distinct vectors "
             f"{result['requests']} requests × {result['tokens']} new tokens in one batch; "
             f"layers steered {result['layer_requests']} requests × {result['layer_tokens']} "
             f"tokens; captures {result['capture_prompts']} prompts, prefill only.", "",
             "| curve | x | vinterp tok/s | plain tok/s | ratio | per repetition |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        reps = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['curve']} | {r['x']} | {r['vinterp_tok_s']:.0f} | "
                     f"{r['plain_tok_s']:.0f} | {r['ratio_median']:.2f}× | {reps} |")
    dv = [r for r in result["rows"] if r["curve"] == "distinct_vectors"]
    if len(dv) > 1:
        vals = [r["vinterp_tok_s"] for r in dv]
        spread = (max(vals) - min(vals)) / statistics.median(vals)
        lines += ["", f"Distinct vectors {dv[0]['x']}–{dv[-1]['x']}: vinterp throughput spread "
                      f"{spread:.1%} of its median (target: flat within 5%)."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = list(dict.fromkeys(r["curve"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, curve in zip(axes, curves, strict=True):
        rows = [r for r in result["rows"] if r["curve"] == curve]
        xs = [r["x"] for r in rows]
        ax.plot(xs, [r["vinterp_tok_s"] for r in rows], "o-", label="vinterp")
        ax.plot(xs, [r["plain_tok_s"] for r in rows], "s--", label="plain vLLM")
        ax.set_title(curve.replace("_", " "))
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions")
    ap.add_argument("--eager", action="store_true", help="both engines with enforce_eager")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4, help="new tokens per request (distinct "
                    "vectors curve)")
    ap.add_argument("--layer-requests", type=int, default=64)
    ap.add_argument("--layer-tokens", type=int, default=32, help="new tokens per request "
                    "(layers steered curve)")
    ap.add_argument("--capture-prompts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.tokens, args.layer_requests, args.layer_tokens = 256, 4, 32, 8
        args.capture_prompts, args.reps = 64, 2
    result = run(args)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = args.out or Path("benchmarks/results/scaling") / (
        f"{stamp}-{platform.node()}" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    (out / "scaling.md").write_text(markdown(result))
    plot(result, out / "scaling.png")
    print(markdown(result))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
