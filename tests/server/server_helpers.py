"""Small helpers shared by the server tests."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import torch

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789",
        "tight": "sk-tight-0123456789", "streamer": "sk-streamer-0123456789",
        "queued": "sk-queued-0123456789", "sessions": "sk-sessions-0123456789",
        "charged": "sk-charged-0123456789", "beams": "sk-beams-0123456789"}
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 512
MAX_BODY = 2 * 2**20
#: six tokens of smollm2's vocabulary (any ids do for a trace)
PROMPT6 = [504, 3458, 282, 260, 2260, 314]


def layer3_trace(n_invokes: int, mode: str = "trace", generation: dict | None = None,
                 invoke_generation: list[dict] | None = None) -> dict[str, Any]:
    """A ``POST /v1/traces`` graph: ``n_invokes`` invokes of :data:`PROMPT6`, each saving
    layers.3's output (``invoke_generation``: each invoke's own generation arguments)."""
    nodes: list[dict[str, Any]] = []
    for i in range(n_invokes):
        nodes += [{"id": 2 * i, "op": "read", "invoke": i,
                   "kwargs": {"module": "model.layers.3", "kind": "output"}},
                  {"id": 2 * i + 1, "op": "save", "args": [{"ref": 2 * i}], "invoke": i}]
    gens = invoke_generation or [{}] * n_invokes
    return {"version": 1, "mode": mode, "nodes": nodes, "tensors": [],
            "generation": generation or {},
            "invokes": [{"prompts": [PROMPT6], "generation": g} for g in gens]}


def wait_until(check: Callable[[], object], what: str, timeout: float = 60.0,
               every: float = 0.05) -> object:
    """Poll ``check`` until it returns something truthy and return that; fail naming
    ``what`` after ``timeout`` seconds. A deadline, not a count of polls: a loaded CI
    machine can take seconds to get a request to the worker (or to answer one: a check's
    HTTP timeout or dropped connection counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except httpx.TransportError:   # (a slow or dropped answer: not yet)
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


def settled(served: Any, timeout: float = 30.0) -> dict:
    """The server's ``/v1/stats`` once the worker holds no request state. A request's state
    is dropped when the worker drains its outcome, which can come a step after its answer;
    state that stays (a leak) fails here after ``timeout`` seconds."""
    def empty() -> dict | None:
        stats = served.stats()
        return stats if stats["states"] == 0 else None
    try:
        return dict(wait_until(empty, "no request state left in the worker", timeout=timeout,
                               every=0.2))
    except AssertionError as err:
        raise AssertionError(f"{err}: {served.stats()}") from None


def scrape(url: str, timeout: float = 60.0) -> str:
    """The server's ``/metrics``, with both the engine's samples (``vllm:``) and the front
    end's (``vinterp_``). Under Ray Serve the ingress gathers each side from every replica
    and leaves out a side whose replicas did not all answer within 5 s, so a scrape on a
    loaded machine can lack one: it is taken again."""
    def complete() -> str | None:
        text = httpx.get(url + "/metrics", timeout=30).text
        return text if "vllm:" in text and "vinterp_capture_bytes_total" in text else None
    return str(wait_until(complete, "a /metrics scrape with every replica's samples",
                          timeout=timeout, every=0.5))


@contextlib.contextmanager
def running_stream(client: httpx.Client, body: dict) -> Iterator[Iterator[str]]:
    """A streamed ``/v1/completions`` that has sent its first token: admitted (its key's slot
    is taken) and generating, for certain. Yields the rest of its lines; the slot is held until
    the stream ends or the block exits (the server aborts the request on the hang-up).

    Waiting on a proxy instead (the worker's state count, a sleep) let the request under test
    take the slot first on a loaded machine. The iterator is kept: a dropped one closes the
    stream."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: {"), first
        yield lines


def engine_cores(pid: int) -> list:
    """The vLLM engine core processes under process ``pid`` (``psutil.Process`` objects);
    a child that exits while it is looked at is skipped."""
    import psutil

    cores = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() + " ".join(child.cmdline()):
                cores.append(child)
        except psutil.Error:
            pass
    return cores


def npy(item: dict) -> torch.Tensor:
    """A capture item's inline ``.npy`` data as a tensor."""
    return torch.from_numpy(np.load(io.BytesIO(base64.b64decode(item["data"])),
                                    allow_pickle=False))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative difference (to b's scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def values(vec: torch.Tensor) -> dict:
    """A vector as the ``{"values": [...]}`` field."""
    return {"values": [float(x) for x in vec]}


def fetch(served, item: dict, who: str = "alice") -> torch.Tensor:
    """A capture item's array, inline or fetched from ``/v1/captures/{id}``."""
    if "data" in item and item["data"] is not None:
        return npy(item)
    with served.client(who) as c:
        r = c.get(f"/v1/captures/{item['id']}")
        r.raise_for_status()
        return torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
