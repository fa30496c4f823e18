"""Graceful shutdown: SIGTERM lets a request in flight finish, then the server exits 0."""

from __future__ import annotations

import threading
import httpx
from server_helpers import wait_until

from vinterp_server.process import launch, serve_command


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    # (120 s to finish: the default 30 s is ~4x this request on an idle machine)
    srv = launch(serve_command("smollm2-135m", "--max-model-len", "512",
                               "--shutdown-timeout", "120"), log=tmp_path / "server.log")
    result: dict = {}

    def long_request() -> None:
        r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
            "model": "smollm2-135m", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True,
            "capture": [{"point": "layers.1.output", "positions": "last", "steps": "all"}]})
        result["response"] = r

    try:
        t = threading.Thread(target=long_request)
        t.start()

        def running() -> bool:
            assert t.is_alive(), f"the request ended before it ran: {result}"
            return httpx.get(srv.url + "/v1/stats", timeout=60).json()["states"] == 1

        wait_until(running, "the request running in the worker", timeout=180)
        code = srv.stop(timeout=180)
        t.join(180)
    finally:
        srv.stop()
    r = result["response"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 200
    assert body["choices"][0]["captures"][0]["shape"] == [200, 576]
    assert code == 0, srv.log_tail()
