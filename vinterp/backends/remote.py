"""The remote backend: a trace's graph sent to a vinterp server (``remote=True``).

Nothing more than an HTTP client of the server's public API: the graph goes as IR JSON to
``POST /v1/traces``, saves come back as JSON plus one safetensors blob
(:mod:`vinterp.ir.results`). No pickle either way, so client and server Python versions are
independent; the IR version is checked on both sides.

The server is ``VINTERP_HOST`` (e.g. ``http://127.0.0.1:8000``) and the key ``VINTERP_API_KEY``
unless given as arguments.

Example::

    with model.trace("The Eiffel Tower is in", remote=True) as tracer:
        h = model.layers[8].output.save()
    with model.trace("...", remote=True, blocking=False) as tracer:
        h = model.layers[8].output.save()
    tracer.wait()                          # polls GET /v1/traces/{id}; then h holds its value
    with model.trace("...", remote=True):  # a vector uploaded with PUT /v1/vectors/happy
        model.layers[8].output.steer(vinterp.named_vector("happy"), scale=4.0)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from vinterp.backends.base import Backend, RunResult
from vinterp.ir import IR_VERSION, Graph
from vinterp.ir.results import decode_results

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NamedVector:
    """A vector stored on the server under ``name`` (``PUT /v1/vectors/{name}``, this key's),
    usable wherever a trace takes a tensor when it runs with ``remote=True``; ``layer`` picks
    one layer's vector from a per-layer upload. Make one with ``vinterp.named_vector``."""

    name: str
    layer: int | None = None


class RemoteError(RuntimeError):
    """The server refused or failed a trace; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _base_url(host: str) -> str:
    host = host.strip().rstrip("/")
    return host if "://" in host else f"http://{host}"


class RemoteBackend(Backend):
    """Runs graphs on a vinterp server (see the module docstring)."""

    name = "remote"

    def __init__(self, host: str | None = None, api_key: str | None = None, *,
                 timeout: float = 600.0, blocking: bool = True) -> None:
        host = host or os.environ.get("VINTERP_HOST")
        if not host:
            raise ValueError("remote=True needs a server: set VINTERP_HOST (e.g. "
                             "http://127.0.0.1:8000, started with `vinterp serve`) or pass "
                             "host=...")
        self.url = _base_url(host)
        self.api_key = api_key if api_key is not None else os.environ.get("VINTERP_API_KEY")
        self.timeout = timeout
        self.blocking = blocking

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _post(self, graph: Graph | list[Graph], blocking: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"ir_version": IR_VERSION, "blocking": blocking}
        if isinstance(graph, list):
            body["session"] = [g.model_dump(mode="json") for g in graph]
        else:
            body["graph"] = graph.model_dump(mode="json")
        try:
            with self._client() as client:
                resp = client.post("/v1/traces", json=body)
        except httpx.TimeoutException:
            raise RemoteError(f"the server at {self.url} did not answer within {self.timeout} "
                              f"s; raise timeout= or use blocking=False", 504) from None
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the vinterp server at {self.url}: {exc}",
                              503) from None
        return _checked(resp)

    def run(self, graph: Graph, *, live: Mapping[int, torch.Tensor] | None = None
            ) -> RunResult:
        """Run ``graph`` on the server and wait for its saves."""
        return _result(self._post(graph, True))

    def run_session(self, graphs: list[Graph]) -> list[RunResult]:
        """Run a session's graphs in one request (``model.session(remote=True)``): in order,
        each one's :class:`~vinterp.ir.SessionValue` tensors filled in on the server from
        the earlier graphs' saves; one result per graph.

        Example::

            results = RemoteBackend("http://127.0.0.1:8000").run_session([g1, g2])
        """
        status = self._post(graphs, True)
        if status["status"] == "failed":
            raise RemoteError(f"the session failed on the server: {status.get('error')}", 500)
        out = []
        for res in status["result"]["traces"]:
            saves, generated = decode_results(res)
            out.append(RunResult(saves=saves, generated=generated))
        return out

    def submit(self, graph: Graph) -> RemoteTrace:
        """Start ``graph`` on the server; poll the returned handle."""
        return RemoteTrace(self, self._post(graph, False)["id"])


class RemoteTrace:
    """A trace running on the server (``blocking=False``)."""

    def __init__(self, backend: RemoteBackend, trace_id: str) -> None:
        self.backend = backend
        self.id = trace_id

    def status(self) -> dict[str, Any]:
        """The server's status object (``queued``/``running``/``done``/``failed``)."""
        with self.backend._client() as client:
            return _checked(client.get(f"/v1/traces/{self.id}"))

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> RunResult:
        """Poll until done; the saves (raises :class:`RemoteError` if the trace failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st["status"] in ("done", "failed"):
                return _result(st)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"trace {self.id} still {st['status']} after {timeout} s")
            time.sleep(poll)


def _checked(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        raise RemoteError(f"the server answered {resp.status_code} without JSON: "
                          f"{resp.text[:200]}", resp.status_code) from None
    if resp.status_code >= 400:
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else str(data)
        raise RemoteError(f"vinterp server ({resp.status_code}): {msg}", resp.status_code)
    version = data.get("ir_version", IR_VERSION)
    if version != IR_VERSION:
        raise RemoteError(f"the server speaks IR version {version} and this vinterp speaks "
                          f"{IR_VERSION}; install matching versions", 400)
    return data


def _result(status: dict[str, Any]) -> RunResult:
    if status["status"] == "failed":
        raise RemoteError(f"the trace failed on the server: {status.get('error')}", 500)
    saves, generated = decode_results(status["result"])
    return RunResult(saves=saves, generated=generated)
