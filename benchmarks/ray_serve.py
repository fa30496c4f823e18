"""The ``ray`` workload: what serving through Ray Serve costs against one process.

``vinterp serve`` (one process) and ``vinterp serve --ray --replicas 1`` (the same app as Ray
Serve's ingress, one engine replica behind a Serve handle) run at once on the same model and
engine settings; the repetitions interleave. Per case: 32 concurrent streaming clients
(plain and steered, generated tokens per second from the streams' ``usage``), and requests
one at a time (total latency of a 1-token completion: the hop's own cost).

More replicas need more machines' worth of cores or GPUs: on a CPU-only machine every replica
shares the same cores, so this measures the hop, not scale-out.

Run: ``.venv/bin/python -m benchmarks.ray_serve [--reps 3]``; the JSON goes to
``benchmarks/results/ray/`` and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.server_load import MAX_MODEL_LEN, MODEL, stream_round, verify_round
from vinterp_server.process import launch, serve_command


async def _latency(url: str, n: int) -> list[float]:
    """Seconds per 1-token completion, ``n`` requests one after the other."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for k in range(n):
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Hello {k}",
                                                      "max_tokens": 1, "temperature": 0})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/ray")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vinterp-ray-bench-"))
    common = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64"]
    servers = {"one_process": launch(serve_command(MODEL, *common), log=tmp / "one.log"),
               "ray_serve": launch(serve_command(MODEL, "--ray", *common), log=tmp / "ray.log",
                                   timeout=900)}
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        for srv in servers.values():   # warm-up
            asyncio.run(stream_round(srv.url, None, "steer", 4, 8))
        for rep in range(a.reps):
            names = list(servers)[rep % 2:] + list(servers)[:rep % 2]
            for name in names:
                url = servers[name].url
                plain = asyncio.run(stream_round(url, None, "plain", a.clients, a.tokens))
                steer = asyncio.run(stream_round(url, None, "steer", a.clients, a.tokens))
                verify_round("plain", plain, None, a.clients, a.tokens)
                verify_round("steer", steer, plain, a.clients, a.tokens)
                lat = asyncio.run(_latency(url, 20))
                rows.setdefault(name, []).append(
                    {"plain_tok_s": plain["tok_s"], "steer_tok_s": steer["tok_s"],
                     "steer_ttft_p50": steer["ttft_p50"], "latency_p50": statistics.median(lat)})
            print(f"rep {rep + 1}/{a.reps}: " + ", ".join(
                f"{k} {v[-1]['plain_tok_s']:.0f}/{v[-1]['steer_tok_s']:.0f} tok/s" for k, v in
                rows.items()), flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    result = {"kind": "ray", "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "cpus": os.cpu_count(), "load": os.getloadavg(), "clients": a.clients,
              "tokens": a.tokens, "reps": a.reps, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{time.strftime('%Y-%m-%d-%H%M')}-{platform.node()}.json").write_text(
        json.dumps(result, indent=1))
    print("\n" + "\n".join(ray_section(result)))
    return 0


def ray_section(result: dict[str, Any]) -> list[str]:
    """A run as Markdown: medians per server and Ray's paired ratios to one process."""
    rows = result["rows"]
    lines = [f"- date: {result['date']}; {result['cpus']} CPUs; {result['clients']} "
             f"concurrent streaming clients x {result['tokens']} tokens; {result['reps']} "
             f"interleaved repetitions; compiled vLLM, float32", "",
             "| server | plain tok/s | steered tok/s | steered TTFT p50 s | 1-token request "
             "p50 ms |", "|---|---|---|---|---|"]
    for name, reps in rows.items():
        def med(k: str, reps: list[dict[str, Any]] = reps) -> float:
            return statistics.median(r[k] for r in reps)
        lines.append(f"| {name} | {med('plain_tok_s'):.0f} | {med('steer_tok_s'):.0f} | "
                     f"{med('steer_ttft_p50'):.2f} | {1000 * med('latency_p50'):.1f} |")
    ray, one = rows["ray_serve"], rows["one_process"]
    for k in ("plain_tok_s", "steer_tok_s"):
        ratios = [r[k] / b[k] for r, b in zip(ray, one, strict=True)]
        lines.append(f"\nRay Serve / one process, {k}: {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}–{max(ratios):.2f})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
