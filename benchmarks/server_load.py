"""The ``server`` workload: 32 concurrent streaming clients on loopback, vinterp's server
against ``vllm serve`` on the same model and engine settings (float32; both in vLLM's compiled
mode, vinterp's default, or both eager with ``--eager``; the JSON's ``modes`` records which).

Both servers run at once (child processes; ``vllm serve`` without the vinterp plugin) and the
repetitions interleave (the order of the cases rotates each repetition), so load drifts hit
every case alike. Per case and repetition: generated tokens per second (tokens counted from
the streams' ``usage``, not assumed), TTFT p50/p99. Each repetition checks its outputs:
steered streams differ from unsteered ones, captures have the expected shape. It also times
the seed's patching example through ``remote=True`` against the local vLLM backend.

Run: ``.venv/bin/python -m benchmarks.server_load [--reps 5] [--clients 32] [--tokens 64]
[--eager]``;
the JSON goes to ``benchmarks/results/server/`` and a Markdown table is printed.
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
import torch

from vinterp_server.process import launch, serve_command, vllm_serve_command

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 512
PROMPTS = [f"Story {i}: once upon a time in a land of {w}," for i, w in enumerate(
    ["mountains", "rivers", "robots", "dragons", "cities", "forests", "oceans", "deserts"] * 16)]


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    text, tokens = [], 0
    captures: dict[int, int] = {}    # capture index -> rows received (over all chunks)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("error"):
                raise RuntimeError(data["error"])
            for ch in data.get("choices") or ():
                if ch.get("text") and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(ch.get("text") or "")
                for c in ch.get("captures") or ():
                    captures[c["index"]] = captures.get(c["index"], 0) + c["shape"][0]
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {"ttft": ttft, "tokens": tokens, "text": "".join(text), "captures": captures}


def _body(k: int, case: str, tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPTS[k], "max_tokens": tokens,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    if case == "steer":
        v = torch.randn(576, generator=torch.Generator().manual_seed(k)) * 4
        body["interventions"] = [{"op": "steer", "layers": [10], "positions": "all",
                                  "vector": {"values": v.tolist()}}]
    elif case == "capture":
        body["capture"] = [{"point": f"layers.{i}.output", "positions": "last"}
                           for i in (5, 10, 15, 20)]
    return body


async def stream_round(url: str, key: str | None, case: str, clients: int, tokens: int,
                 sequential: bool = False) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        bodies = [_body(k, case, tokens) for k in range(clients)]
        t0 = time.perf_counter()
        if sequential:
            outs = [await _stream(c, b) for b in bodies]
        else:
            outs = await asyncio.gather(*(_stream(c, b) for b in bodies))
        wall = time.perf_counter() - t0
    ttfts = sorted(o["ttft"] for o in outs)
    total = sum(o["tokens"] for o in outs)
    return {"tok_s": total / wall, "tokens": total, "wall": wall,
            "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "outs": outs}


def verify_round(case: str, res: dict[str, Any], plain: dict[str, Any] | None, clients: int,
            tokens: int) -> None:
    assert res["tokens"] == clients * tokens, (case, res["tokens"])
    if case == "steer" and plain is not None:
        changed = sum(a["text"] != b["text"] for a, b in zip(res["outs"], plain["outs"],
                                                             strict=True))
        assert changed >= clients // 2, f"steering changed only {changed} of {clients}"
    if case == "capture":
        for o in res["outs"]:
            assert o["captures"] == {0: 1, 1: 1, 2: 1, 3: 1}, o["captures"]


def _patch_times(url: str, key: str | None, reps: int, eager: bool
                 ) -> dict[str, list[float]]:
    from vinterp import LanguageModel

    # the local backend in the servers' mode (explicit: VINTERP_VLLM_EAGER would change it)
    lm = LanguageModel(MODEL, backend="vllm", max_model_len=MAX_MODEL_LEN,
                       enforce_eager=eager)

    def once(**remote: Any) -> float:
        t0 = time.perf_counter()
        with lm.trace("The Eiffel Tower is in the city of", **remote):
            clean = lm.layers[8].output.save()
        with lm.trace("The Colosseum is in the city of", **remote):
            lm.layers[8].output[:] = clean
            lm.logits.save()
        return time.perf_counter() - t0
    once()
    once(remote=url, api_key=key)
    out: dict[str, list[float]] = {"local": [], "remote": []}
    for _ in range(reps):
        out["local"].append(once())
        out["remote"].append(once(remote=url, api_key=key))
    return out


#: what a server JSON without ``modes`` ran: vllm serve had --enforce-eager, and vinterp's vllm
#: backend ran eager only until its compiled default (commit 0a6ab96, 2026-11-27 13:43)
_MODES_BEFORE_RECORDED = ("both servers eager float32 (the JSON records no mode: vllm serve "
                          "ran with --enforce-eager, and vinterp's vllm backend had only eager "
                          "mode before commit 0a6ab96)")


def modes_text(result: dict[str, Any]) -> str:
    """Which vLLM mode each server ran in, from the JSON's ``modes``."""
    modes = result.get("modes")
    if not modes:
        return _MODES_BEFORE_RECORDED
    servers = {k: v for k, v in modes.items() if k in ("vllm_serve", "vinterp")}
    if len(set(servers.values())) == 1:
        return f"both servers {next(iter(servers.values()))} float32"
    return ("**servers in different modes**: "
            + ", ".join(f"{k} {v}" for k, v in servers.items()) + "; float32")


def server_section(result: dict[str, Any]) -> list[str]:
    """A server run as Markdown: the table, the targets (issue 10) and the patching time."""
    rows, med, paired = result["rows"], result["median_tok_s"], result["paired_ratios"]
    lines = [f"- date: {result['date']}; {result['cpus']} CPUs; load average at end "
             f"{[round(x, 2) for x in result['load']]}; {result['clients']} concurrent "
             f"streaming clients x {result['tokens']} tokens (greedy, ignore_eos), "
             f"{result['reps']} interleaved repetitions with the case order rotated; "
             f"{modes_text(result)}, same engine settings, up at once; every repetition "
             f"verified (measured token counts, steered text changed, capture rows)", "",
             "| case | tok/s (median) | TTFT p50 s | TTFT p99 s | paired ratio (min–max) |",
             "|---|---|---|---|---|"]
    for k, v in rows.items():
        p50 = statistics.median(r["ttft_p50"] for r in v)
        p99 = statistics.median(r["ttft_p99"] for r in v)
        pr = paired.get(k)
        ratio = "" if pr is None else \
            f"{statistics.median(pr):.2f} ({min(pr):.2f}–{max(pr):.2f})"
        lines.append(f"| {k} | {med[k]:.0f} | {p50:.2f} | {p99:.2f} | {ratio} |")
    patch = result["patch_seconds"]
    local, remote = statistics.median(patch["local"]), statistics.median(patch["remote"])

    def verdict(xs: list[float], bound: float) -> str:
        met = sum(x >= bound for x in xs)
        return "yes" if met == len(xs) else ("no" if met == 0 else
                                             f"within noise ({met} of {len(xs)} reps)")
    one = med["vinterp"] / med["vinterp_one_at_a_time"]
    lines += ["", "Targets (issue 10):", "",
              f"- unsteered >= 0.9x vllm serve: {statistics.median(paired['vinterp']):.2f}x — "
              f"{verdict(paired['vinterp'], 0.9)}",
              f"- a distinct steering vector per client >= 0.9x unsteered: "
              f"{statistics.median(paired['vinterp_steer']):.2f}x — "
              f"{verdict(paired['vinterp_steer'], 0.9)}",
              f"- last-token capture at 4 layers >= 0.8x unsteered: "
              f"{statistics.median(paired['vinterp_capture4']):.2f}x — "
              f"{verdict(paired['vinterp_capture4'], 0.8)}",
              f"- >= 10x one request at a time (NDIF's model): {one:.1f}x — "
              f"{'yes' if one >= 10 else 'no'}",
              f"- the seed's patching example via remote=True <= 1.5x the local vLLM backend: "
              f"remote {remote:.3f} s, local {local:.3f} s ({remote / local:.2f}x) — "
              f"{'yes' if remote <= 1.5 * local else 'no'}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/server")
    ap.add_argument("--eager", action="store_true",
                    help="both servers (and the local backend) in eager mode; default: both "
                         "in vLLM's compiled mode, vinterp's default")
    a = ap.parse_args(argv)
    from vinterp.backends.vllm.engine import default_kv_cache_bytes
    from vinterp.models.registry import resolve_model

    path = str(resolve_model(MODEL))
    tmp = Path(tempfile.mkdtemp(prefix="vinterp-server-bench-"))
    env = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    common = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64"]
    # Like for like: both servers compiled (vinterp's default), or both eager with --eager.
    # vinterp's mode is set explicitly (VINTERP_VLLM_EAGER in the caller's environment would
    # otherwise make it eager against a compiled vllm serve).
    mode = "eager" if a.eager else "compiled"
    # compiled start-up runs torch.compile, minutes on 2 CPU cores (both servers at once)
    start_s = 240 if a.eager else 900
    plain = launch(vllm_serve_command(
        path, "--served-model-name", MODEL, "--host", "127.0.0.1", "--dtype", "float32",
        *(["--enforce-eager"] if a.eager else []), "--seed", "0", "--kv-cache-memory-bytes",
        str(default_kv_cache_bytes()), *common), log=tmp / "vllm.log",
        env={**env, "VLLM_PLUGINS": ""}, timeout=start_s)   # plain vLLM: no vinterp plugin
    ours = launch(serve_command(MODEL, *common), log=tmp / "vinterp.log",
                  env={**env, "VINTERP_VLLM_EAGER": "1" if a.eager else "0"}, timeout=start_s)
    vllm_url, vi_url = plain.url, ours.url
    cases = [("vllm_serve", vllm_url, "plain", False), ("vinterp", vi_url, "plain", False),
             ("vinterp_steer", vi_url, "steer", False),
             ("vinterp_capture4", vi_url, "capture", False)]
    rows: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
    rows["vinterp_one_at_a_time"] = []
    try:
        for url in (vllm_url, vi_url):   # warm-up
            asyncio.run(stream_round(url, None, "plain", 4, 8))
        asyncio.run(stream_round(vi_url, None, "steer", 4, 8))
        for rep in range(a.reps):
            order = cases[rep % len(cases):] + cases[:rep % len(cases)]
            got: dict[str, dict[str, Any]] = {}
            for name, url, case, seq in order:
                got[name] = asyncio.run(stream_round(url, None, case, a.clients, a.tokens, seq))
            for name, _, case, _ in cases:
                verify_round(case, got[name], got["vinterp"], a.clients, a.tokens)
                rows[name].append({k: v for k, v in got[name].items() if k != "outs"})
            # NDIF's model: the same requests one at a time (fewer, it is slow)
            n_seq = max(4, a.clients // 4)
            seq = asyncio.run(stream_round(vi_url, None, "plain", n_seq, a.tokens, True))
            rows["vinterp_one_at_a_time"].append({k: v for k, v in seq.items() if k != "outs"})
            print(f"rep {rep + 1}/{a.reps}: " + ", ".join(
                f"{k} {v[-1]['tok_s']:.0f} tok/s" for k, v in rows.items()), flush=True)
        patch = _patch_times(vi_url, None, a.reps, a.eager)
    finally:
        plain.stop()
        ours.stop()
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in rows.items()}
    paired = {k: [r["tok_s"] / b["tok_s"] for r, b in zip(v, rows[base], strict=True)]
              for k, v, base in (("vinterp", rows["vinterp"], "vllm_serve"),
                                 ("vinterp_steer", rows["vinterp_steer"], "vinterp"),
                                 ("vinterp_capture4", rows["vinterp_capture4"], "vinterp"))}
    result = {"kind": "server", "workloads": ["server"],
              "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "cpus": os.cpu_count(), "load": os.getloadavg(), "clients": a.clients,
              "tokens": a.tokens, "reps": a.reps, "rows": rows, "median_tok_s": med,
              "paired_ratios": paired, "patch_seconds": patch,
              # each server's vLLM mode (and the local backend's, for the patching time)
              "modes": {"vllm_serve": mode, "vinterp": mode, "local_vllm_backend": mode}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{time.strftime('%Y-%m-%d')}-{platform.node()}.json").write_text(
        json.dumps(result, indent=1))
    print("\n" + "\n".join(server_section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
