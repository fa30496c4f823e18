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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vinterp_server.auth import ApiKeys, Limits
from vinterp_server.context import Settings

if TYPE_CHECKING:  # (the CLI imports this module without loading vLLM)
    from vinterp_server.engine import EngineHost

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
    p.add_argument("--shutdown-timeout", type=float, default=st.shutdown_timeout,
                   metavar="S", help="on SIGTERM, seconds requests in flight and background "
                   "traces get to finish before they are stopped (default %(default)s)")
    p.add_argument("--store-path", metavar="DIR",
                   help="keep named vectors, stored captures and trace results in SQLite files "
                        "in DIR, so they outlive a restart (default: in memory)")
    ray = p.add_argument_group("Ray Serve (scale-out: the same app in front of N engines)")
    ray.add_argument("--replicas", type=int, default=1,
                     help="engine replicas; more than 1 serves through Ray Serve")
    ray.add_argument("--ingress-replicas", type=int, default=1,
                     help="replicas of the HTTP app; more than 1 share per-key state through "
                          "Ray actors")
    ray.add_argument("--store-shards", type=int, default=None,
                     help="Ray actors holding the shared per-key state, each key in one "
                          "(default: one per ingress replica)")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve even with one replica")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="join this Ray cluster (default: start one on this machine)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="GPUs per engine replica (default: 1 where CUDA is present, else 0)")
    ray.add_argument("--replica-cpus", type=float, default=0,
                     help="CPUs Ray reserves per engine replica")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys_and_address(args: argparse.Namespace) -> tuple[ApiKeys, str]:
    """The API keys, and the address to bind (loopback when no keys are configured)."""
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
    return keys, host_addr


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(inline_capture_bytes=args.inline_capture_bytes,
                    capture_ttl=args.result_ttl, trace_ttl=args.result_ttl,
                    max_body_bytes=args.max_body_bytes,
                    shutdown_timeout=args.shutdown_timeout)


@dataclass
class Outcome:
    """How serving ended: ``engine_died`` makes the exit code 1 (also when SIGTERM comes
    while the server drains after the death)."""

    engine_died: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.engine_died else 0


async def serve(args: argparse.Namespace, vllm_argv: Sequence[str], keys: ApiKeys,
                host_addr: str, outcome: Outcome | None = None) -> int:
    """Start the engine, then serve HTTP until SIGINT/SIGTERM (in-flight requests finish) or
    the engine dies; returns the exit code (1: the engine died)."""
    outcome = outcome or Outcome()
    import uvicorn

    from vinterp_server.app import build_app
    from vinterp_server.engine import LocalEngineHost
    from vinterp_server.sqlite_store import SqliteStore
    from vinterp_server.traces import finish_background
    from vinterp_server.store import MemoryStore, ShardedStore, Store

    on_disk = [SqliteStore(f) for f in args.store_files or ()]
    store: Store = (MemoryStore() if not on_disk else on_disk[0] if len(on_disk) == 1
                    else ShardedStore(on_disk))
    print(f"vinterp serve: starting the engine for {args.model} ...", file=sys.stderr,
          flush=True)
    host = await LocalEngineHost.start(args.model, list(vllm_argv))
    settings = _settings(args)
    app = build_app(host, keys, store, settings)
    config = uvicorn.Config(app, host=host_addr, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=settings.shutdown_timeout,
                            lifespan="off")
    server = uvicorn.Server(config)
    watchdog = asyncio.create_task(_exit_when_engine_dies(host, server, outcome))
    try:
        print(f"vinterp serve: ready on http://{host_addr}:{args.port} "
              f"(model {args.model}; OpenAI API at /v1)", file=sys.stderr, flush=True)
        await server.serve()
    finally:
        watchdog.cancel()
        # background traces (blocking=false) hold no connection uvicorn waits for
        await finish_background(app.state.vinterp, timeout=settings.shutdown_timeout)
        await host.shutdown()
        for shard in on_disk:
            shard.close()
    return outcome.exit_code


async def _exit_when_engine_dies(host: EngineHost, server: Any, outcome: Outcome,
                                 every: float = 1.0) -> None:
    """Stop serving once the engine died, so the process exits 1 and its supervisor restarts
    it: a server that answers ``/health`` but fails every request helps nobody. vLLM's
    ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1`` keeps it up, answering 503s."""
    import vllm.envs

    from vinterp_server.engine import engine_down

    if vllm.envs.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH:
        return
    while not await engine_down(host):
        await asyncio.sleep(every)
    print("vinterp serve: the engine died (see above); stopping with exit code 1 so that a "
          "supervisor restarts the server (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 keeps it up, "
          "answering 503)", file=sys.stderr, flush=True)
    outcome.engine_died = True
    server.should_exit = True


def serve_ray(args: argparse.Namespace, vllm_argv: Sequence[str], keys: ApiKeys,
              host_addr: str) -> int:
    """The same app on Ray Serve, in front of ``--replicas`` engine replicas, until
    SIGINT/SIGTERM (then its own app and, if this process started the cluster, Ray stop);
    returns the exit code.

    Without ``--ray-address`` it starts a cluster of its own (``address="local"``: an
    existing local cluster is left alone). On a shared cluster it refuses, rather than
    surprise anyone, to run where Serve already answers on another host or port than
    ``--host``/``--port`` (the app would answer there) or where an app named ``vinterp``
    runs; and it deletes only its own app when it stops.
    """
    import ray
    from ray import serve as ray_serve

    from vinterp.models.registry import resolve_model
    from vinterp_server.engine import vllm_serve_args
    from vinterp_server.ray_deployment import build_ray_app
    from vinterp_server.ray_store import start_store_actors

    # what the one-process server refuses in seconds is refused here too, before Ray starts
    # (a replica's own error would surface only as "failed to update the deployments")
    vllm_serve_args(str(resolve_model(args.model)), args.model, list(vllm_argv))
    gpus = args.replica_gpus
    if gpus is None:
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
    # the engine core runs in a child process of each replica, as in `vinterp serve`
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_HOST_IP": "127.0.0.1"}
    own_cluster = args.ray_address is None
    ray.init(address=args.ray_address or "local", runtime_env={"env_vars": env},
             include_dashboard=False, log_to_driver=False)
    # ray.init installs a SIGTERM handler that only logs and dies: take it back, so SIGTERM
    # stops the deployments and the local cluster below (else Ray's agents outlive us)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stores: dict[str, Any] = {}
    deployed = False
    serve_was_up = own_cluster or _serve_running()
    try:
        ray_serve.start(http_options={"host": host_addr, "port": args.port})
        refusal = _shared_cluster_refusal(ray_serve, host_addr, args.port)
        if refusal:
            print(f"vinterp serve: {refusal}", file=sys.stderr, flush=True)
            return 2
        print(f"vinterp serve: starting {args.replicas} engine replica(s) for {args.model} "
              f"on Ray Serve ...", file=sys.stderr, flush=True)
        # several ingresses share the store's actors; a store kept on disk is an actor too,
        # so that Ray brings it back (with its file) if its process dies
        if args.ingress_replicas > 1 or args.store_files:
            stores = start_store_actors(f"vinterp-store-{os.getpid()}", _shards(args),
                                        args.store_files)
        app = build_ray_app(args.model, list(vllm_argv), replicas=args.replicas, keys=keys,
                            settings=_settings(args),
                            replica_actor_options={"num_cpus": args.replica_cpus,
                                                   "num_gpus": gpus},
                            ingress_replicas=args.ingress_replicas,
                            store_actors=list(stores) or None)
        deployed = True
        try:
            ray_serve.run(app, name=RAY_APP, route_prefix="/")
        except RuntimeError as exc:
            print(f"vinterp serve: the app did not start on Ray Serve: "
                  f"{_deploy_failure(ray_serve) or exc}", file=sys.stderr, flush=True)
            return 1
        print(f"vinterp serve: ready on http://{host_addr}:{args.port} (model {args.model}; "
              f"OpenAI API at /v1; {args.replicas} engine and {args.ingress_replicas} ingress "
              f"replica(s) on Ray Serve)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if deployed and not own_cluster:
            ray_serve.delete(RAY_APP)   # (shutdown() would delete every app on the cluster)
        if own_cluster or not serve_was_up:
            ray_serve.shutdown()        # (Serve started here; on a shared cluster, idle)
        for store in stores.values():   # detached: they would outlive us on a shared cluster
            ray.kill(store)
        ray.shutdown()


#: the Serve application's name on the cluster
RAY_APP = "vinterp"


def _serve_running() -> bool:
    """Whether Ray Serve already runs on the cluster this process joined."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def _shared_cluster_refusal(ray_serve: Any, host: str, port: int) -> str | None:
    """Why this app must not be deployed on the cluster as it is, or ``None``."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if (http.host, http.port) != (host, port):
        return (f"Ray Serve on this cluster already answers HTTP on {http.host}:{http.port}, "
                f"so the app would answer there, not on {host}:{port}; pass --host "
                f"{http.host} --port {http.port} to serve there (with --api-keys unless that "
                f"is loopback), or use a cluster of its own (leave out --ray-address)")
    if RAY_APP in ray_serve.status().applications:
        return (f"an app named {RAY_APP!r} already runs on this Ray cluster (another vinterp "
                "serve?); stop it first, or use a cluster of its own")
    return None


def _deploy_failure(ray_serve: Any) -> str | None:
    """The replicas' own error when the app failed to deploy (Serve's says only that the
    deployments failed to update), e.g. vLLM refusing its settings."""
    try:
        app = ray_serve.status().applications.get(RAY_APP)
    except Exception:   # (the controller is gone: nothing more to say)
        return None
    if app is None:
        return None
    messages = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "; ".join(messages) or app.message or None


def _shards(args: argparse.Namespace) -> int:
    """How many shards the per-key store has: ``--store-shards``, else one per ingress."""
    return args.store_shards or args.ingress_replicas


def main(args: argparse.Namespace, vllm_argv: Sequence[str]) -> int:
    """Run the server in the foreground; returns the exit code."""
    # The engine core is a child process; the CPU platform spawns it, which re-imports
    # __main__ — the CLI entry point is import-safe.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for flag in ("replicas", "ingress_replicas", "store_shards"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"vinterp serve: --{flag.replace('_', '-')} {getattr(args, flag)}: use 1 or "
                  f"more", file=sys.stderr)
            return 2
    if args.shutdown_timeout < 0:
        print(f"vinterp serve: --shutdown-timeout {args.shutdown_timeout:g}: use 0 or more "
              f"seconds", file=sys.stderr)
        return 2
    args.store_files = None
    if args.store_path:
        import sqlite3

        from vinterp_server.sqlite_store import SqliteStore, shard_files

        try:   # refused before anything starts: a wrong shard count, a file not ours
            args.store_files = shard_files(args.store_path, _shards(args))
            for f in args.store_files:
                SqliteStore(f).close()
        except (ValueError, OSError, sqlite3.DatabaseError) as exc:
            print(f"vinterp serve: --store-path {args.store_path}: {exc}", file=sys.stderr)
            return 2
    try:   # a key file's mistakes are refused before anything starts, in one line
        keys, host_addr = _keys_and_address(args)
    except (OSError, ValueError) as exc:
        print(f"vinterp serve: {exc}", file=sys.stderr)
        return 2
    from vinterp.models.registry import resolve_model

    # an unknown model is refused here, in about a second: before vLLM, torch or Ray load
    resolve_model(args.model)
    if args.replicas > 1 or args.ingress_replicas > 1 or args.ray or args.ray_address:
        return serve_ray(args, vllm_argv, keys, host_addr)
    outcome = Outcome()
    try:
        return asyncio.run(serve(args, vllm_argv, keys, host_addr, outcome))
    except KeyboardInterrupt:
        return outcome.exit_code
