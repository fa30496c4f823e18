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
import warnings
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
        return _checked(self._request("POST", "/v1/traces", json=body,
                                      hint="; raise timeout= or use blocking=False"))

    def _request(self, method: str, path: str, *, timeout: float | None = None,
                 hint: str = "", **kw: Any) -> httpx.Response:
        """One request to the server; httpx's errors become :class:`RemoteError` (504: no
        answer within ``timeout``, default the backend's; 503: unreachable), so callers see
        one exception type for every way the server can fail them."""
        timeout = self.timeout if timeout is None else timeout
        try:
            with self._client() as client:
                return client.request(method, path, timeout=timeout, **kw)
        except httpx.TimeoutException:
            raise RemoteError(f"the server at {self.url} did not answer within {timeout:g} "
                              f"s{hint}", 504) from None
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the vinterp server at {self.url}: {exc}",
                              503) from None

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
            raise RemoteError(f"the session failed on the server: {status.get('error')}",
                              int(status.get("code") or 500))
        out = []
        for res in status["result"]["traces"]:
            saves, generated = decode_results(res)
            out.append(RunResult(saves=saves, generated=generated))
        return out

    def submit(self, graph: Graph) -> RemoteTrace:
        """Start ``graph`` on the server; poll the returned handle."""
        return RemoteTrace(self, self._post(graph, False)["id"])


# Answers a proxy or a restarting server gives while the trace may still be running (or
# be kept in a store that outlives the restart): a poll that gets one is tried again.
_TRANSIENT = frozenset({502, 503, 504})
_FIRST_BACKOFF = 0.25       # seconds before the first retry, doubling up to _MAX_BACKOFF
_MAX_BACKOFF = 4.0
_MIN_POLL_TIMEOUT = 1.0     # a poll near the deadline still gets this long to answer
#: seconds a wait with no timeout goes on while the server stays unreachable: a restart takes
#: a minute or two; a server that does not come back must not hang the caller for good
MAX_OUTAGE_S = 600.0


class RemoteTrace:
    """A trace running on the server (``blocking=False``)."""

    def __init__(self, backend: RemoteBackend, trace_id: str) -> None:
        self.backend = backend
        self.id = trace_id

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's status object (``queued``/``running``/``done``/``failed``); raises
        :class:`RemoteError` when the server cannot be reached (503), does not answer within
        ``timeout`` (default the backend's; 504) or no longer knows the trace (404)."""
        resp = self.backend._request("GET", f"/v1/traces/{self.id}", timeout=timeout)
        try:
            return _checked(resp)
        except RemoteError as exc:
            if exc.status != 404:
                raise
            # polling again cannot help: the result is gone (or was never this key's)
            raise RemoteError(f"the server at {self.backend.url} no longer knows trace "
                              f"{self.id}: it was restarted without --store-path, the "
                              f"result expired, or the trace is another key's ({exc})",
                              404) from None

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> RunResult:
        """Poll until done; the saves. Raises :class:`RemoteError` if the trace failed, at
        once if the server no longer knows it (404), and after ``timeout`` seconds (default:
        no limit) if the server stayed unreachable or answered 502/503/504 (those are
        retried with backoff, so a restarting server or a dropped poll does not end the
        wait; with no ``timeout``, an outage ends it after ``MAX_OUTAGE_S``);
        :class:`TimeoutError` if it is still queued or running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = _FIRST_BACKOFF
        warned = False
        outage: float | None = None   # when the polls started failing
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                # one poll never waits past the deadline (the backend's timeout is minutes)
                st = self.status(None if left is None
                                 else max(_MIN_POLL_TIMEOUT, min(self.backend.timeout, left)))
            except RemoteError as exc:
                if exc.status not in _TRANSIENT:
                    raise
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RemoteError(f"trace {self.id}: gave up after {timeout:g} s without "
                                      f"a status; last: {exc}", exc.status) from None
                outage = time.monotonic() if outage is None else outage
                if left is None and time.monotonic() - outage > MAX_OUTAGE_S:
                    raise RemoteError(f"trace {self.id}: no status for {MAX_OUTAGE_S:g} s, "
                                      f"giving up; last: {exc}", exc.status) from None
                if not warned and deadline is None:
                    # with no timeout this can last as long as the outage: say so once
                    warnings.warn(f"trace {self.id}: {exc}; retrying until the server "
                                  f"answers (pass wait(timeout=...) to give up)",
                                  RuntimeWarning, stacklevel=2)
                    warned = True
                time.sleep(backoff if left is None else min(backoff, left))
                backoff = min(2 * backoff, _MAX_BACKOFF)
                continue
            backoff, outage = _FIRST_BACKOFF, None
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
        # the server's status for why (429 a limit, 413 too large, 503 it stopped; servers
        # before TraceStatus.code gave none: 500)
        raise RemoteError(f"the trace failed on the server: {status.get('error')}",
                          int(status.get("code") or 500))
    saves, generated = decode_results(status["result"])
    return RunResult(saves=saves, generated=generated)
