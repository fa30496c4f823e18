"""``vinterp serve``: one process, one ``AsyncLLM`` engine with the plugin, one HTTP server.

vinterp's own options are parsed here; everything else goes to vLLM's ``serve`` parser
(engine options such as ``--max-model-len``, ``--max-num-seqs``, ``--dtype``; front-end
options such as ``--chat-template``), so vLLM users keep their flags.

Example::

    vinterp serve --model smollm2-135m --port 8000 --api-keys keys.txt --max-model-len 2048
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence

from vinterp_server.auth import ApiKeys, Limits
from vinterp_server.context import Settings

def add_arguments(p: argparse.ArgumentParser) -> None:
    """vinterp's ``serve`` options (the rest go to vLLM)."""
    p.add_argument("--model", default="smollm2-135m",
                   help="a vinterp model name (vinterp models list) or a local HF directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", metavar="FILE", help="API key file (one key a line: KEY "
                   "[name] [limit=N ...]); VINTERP_API_KEYS adds comma-separated keys")
    lim = Limits()
    p.add_argument("--max-concurrent", type=int, default=lim.concurrent,
                   help="per key: requests in flight")
    p.add_argument("--tokens-per-minute", type=int, default=lim.tokens_per_minute,
                   help="per key: prompt + generated tokens per minute")
    p.add_argument("--max-capture-bytes", type=int, default=lim.capture_bytes,
                   help="per key: bytes one request may capture")
    p.add_argument("--max-graph-nodes", type=int, default=lim.graph_nodes,
                   help="per key: nodes in one graph")
    st = Settings()
    p.add_argument("--inline-capture-bytes", type=int, default=st.inline_capture_bytes,
                   help="captures past this many bytes per response are stored and fetched "
                        "from /v1/captures/{id}")
    p.add_argument("--max-body-bytes", type=int, default=st.max_body_bytes,
                   help="larger request bodies get 413")
    p.add_argument("--result-ttl", type=float, default=st.capture_ttl,
                   help="seconds stored captures and trace results are kept")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace, vllm_argv: Sequence[str]) -> None:
    """Start the engine, then serve HTTP until SIGINT/SIGTERM (in-flight requests finish)."""
    import uvicorn

    from vinterp_server.app import build_app
    from vinterp_server.engine import LocalEngineHost
    from vinterp_server.store import MemoryStore

    limits = Limits(concurrent=args.max_concurrent, tokens_per_minute=args.tokens_per_minute,
                    capture_bytes=args.max_capture_bytes, graph_nodes=args.max_graph_nodes)
    keys = ApiKeys.load(args.api_keys, limits)
    host_addr = args.host
    if len(keys) == 0 and not _is_loopback(host_addr):
        print(f"vinterp serve: no API keys configured, so binding to 127.0.0.1 instead of "
              f"{host_addr}; pass --api-keys FILE (or VINTERP_API_KEYS) to serve others",
              file=sys.stderr, flush=True)
        host_addr = "127.0.0.1"
    elif len(keys) == 0:
        print("vinterp serve: no API keys configured: open to local callers only (loopback)",
              file=sys.stderr, flush=True)
    print(f"vinterp serve: starting the engine for {args.model} ...", file=sys.stderr,
          flush=True)
    host = await LocalEngineHost.start(args.model, list(vllm_argv))
    settings = Settings(inline_capture_bytes=args.inline_capture_bytes,
                        capture_ttl=args.result_ttl, trace_ttl=args.result_ttl,
                        max_body_bytes=args.max_body_bytes)
    app = build_app(host, keys, MemoryStore(), settings)
    config = uvicorn.Config(app, host=host_addr, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30, lifespan="off")
    server = uvicorn.Server(config)
    try:
        print(f"vinterp serve: ready on http://{host_addr}:{args.port} "
              f"(model {args.model}; OpenAI API at /v1)", file=sys.stderr, flush=True)
        await server.serve()
    finally:
        await host.shutdown()


def main(args: argparse.Namespace, vllm_argv: Sequence[str]) -> int:
    """Run the server in the foreground; returns the exit code."""
    # The engine core is a child process; the CPU platform spawns it, which re-imports
    # __main__ — the CLI entry point is import-safe.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(serve(args, vllm_argv))
    except KeyboardInterrupt:
        pass
    return 0
