"""``tracer.wait()`` for ``remote=True, blocking=False`` against the real server: polls a
gateway drops or answers 502/503/504 (as one does while the server behind it restarts) are
retried, and a trace the server does not know fails at once instead of being polled."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from server_helpers import KEYS, MODEL

from vinterp.backends.remote import RemoteBackend, RemoteError, RemoteTrace

EIFFEL = "The Eiffel Tower is in the city of"


class Gateway:
    """A loopback HTTP gateway in front of the real server. Each poll of a trace
    (``GET /v1/traces/...``) takes the next answer from ``script``: ``"drop"`` closes the
    connection unanswered, a number answers that status with a plain-text body (what a
    gateway with no upstream sends); with the script used up it forwards, as do other
    requests."""

    def __init__(self, upstream: str, script: list[str]) -> None:
        self.script = list(script)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/v1/traces/") and gateway.script:
                    what = gateway.script.pop(0)
                    if what == "drop":
                        self.close_connection = True
                        return
                    body = b"upstream unavailable"
                    self.send_response(int(what))
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                r = httpx.request(self.command, upstream + self.path, headers=headers,
                                  content=self.rfile.read(length), timeout=120)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "text/plain"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway(served) -> Iterator[Gateway]:
    g = Gateway(served.url, [])
    try:
        yield g
    finally:
        g.close()


def _model(url: str):
    from vinterp import LanguageModel

    return LanguageModel(MODEL, backend="remote", host=url, api_key=KEYS["alice"])


def test_wait_rides_out_dropped_and_refused_polls(served, gateway):
    """Each failing answer used to end the wait with a raw httpx error (or a RemoteError
    for the 5xx); now the wait goes on and gets the trace's real saves. With no timeout it
    says once that it is retrying."""
    lm = _model(gateway.url)
    with lm.trace(EIFFEL, blocking=False) as tracer:
        late = lm.layers[4].output.save()
    gateway.script = ["drop", "502", "503", "504"]
    with pytest.warns(RuntimeWarning, match="retrying until the server answers"):
        tracer.wait()
    assert gateway.script == []
    plain = _model(served.url)                  # the same trace, blocking, no gateway
    with plain.trace(EIFFEL):
        ref = plain.layers[4].output.save()
    assert torch.equal(late, ref)


def test_wait_gives_up_at_its_timeout_saying_what_it_last_saw(served, gateway):
    lm = _model(gateway.url)
    with lm.trace(EIFFEL, blocking=False) as tracer:
        lm.layers[4].output.save()
    gateway.script = ["503"] * 1000
    start = time.monotonic()
    with pytest.raises(RemoteError) as err:
        tracer.wait(timeout=2)
    assert 2 <= time.monotonic() - start < 8
    assert err.value.status == 503
    assert f"trace {tracer.handle.id}: gave up after 2 s without a status" in str(err.value)
    assert "503 without JSON: upstream unavailable" in str(err.value)


def test_a_trace_the_server_does_not_know_fails_at_once(served):
    """A 404 (a restart without --store-path, an expired result, another key's trace) is
    final: wait() with no timeout raises at once instead of polling on."""
    lm = _model(served.url)
    with lm.trace(EIFFEL, blocking=False) as tracer:
        lm.layers[4].output.save()
    tracer.wait(timeout=120)
    for who, trace_id in (("alice", "trace-gone"), ("bob", tracer.handle.id)):
        start = time.monotonic()
        with pytest.raises(RemoteError) as err:
            RemoteTrace(RemoteBackend(served.url, KEYS[who]), trace_id).wait()
        assert time.monotonic() - start < 10
        assert err.value.status == 404
        message = str(err.value)
        assert message.startswith(f"the server at {served.url} no longer knows trace "
                                  f"{trace_id}: it was restarted without --store-path"), message
        assert f"no trace {trace_id!r} for this key" in message
