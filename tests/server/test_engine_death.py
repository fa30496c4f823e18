"""When the engine dies under a running server: ``/health`` says so (503), every request gets
a 503 that says the engine stopped (not a 500 blaming the request), and by default the
server exits 1 so that its supervisor restarts it."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from server_helpers import KEYS, MODEL, engine_cores, wait_until

from vinterp.backends.remote import RemoteError
from vinterp_server.process import ServerProcess, launch, serve_command

LONG = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}
STEER = [{"op": "scale", "layers": [3], "factor": 1.5}]


def _start(tmp: Path, env: dict[str, str] | None = None) -> ServerProcess:
    # eager: what happens on engine death does not depend on compilation, which would add
    # about a minute to each start on two CPUs
    return launch(serve_command(MODEL, "--max-model-len", "512", "--enforce-eager"),
                  log=tmp / "server.log", env=env)


def _kill_engine_core(srv: ServerProcess) -> None:
    cores = engine_cores(srv.proc.pid)
    assert cores, "the server's engine core process was not found"
    for c in cores:
        c.kill()


def _in_flight(srv: ServerProcess, results: dict, name: str, body: dict,
               streaming: threading.Event | None = None) -> threading.Thread:
    """``body`` sent from a thread; its (status, text) lands in ``results[name]``. A stream
    sets ``streaming`` once its first token has arrived (its 200 is sent then)."""
    def run() -> None:
        with httpx.Client(timeout=120) as c:
            if body.get("stream"):
                with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    text = []
                    for part in r.iter_text():
                        text.append(part)
                        if streaming is not None and "data: {" in part:
                            streaming.set()
                    results[name] = (r.status_code, "".join(text))
            else:
                r = c.post(srv.url + "/v1/completions", json=body)
                results[name] = (r.status_code, r.text)

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_running(srv: ServerProcess, n: int, results: dict, threads: int) -> None:
    """Wait until ``n`` requests hold state in the worker. Fails at once, with what they
    answered and the server's log, if every request thread ended first; on a timeout the log
    says where the requests were (a loaded CI machine once took over 60 s)."""
    def running() -> bool:
        if len(results) == threads:
            raise AssertionError("the requests ended before the engine was killed")
        return httpx.get(srv.url + "/v1/stats").json()["states"] >= n
    try:
        wait_until(running, f"{n} request(s) running in the worker", timeout=180)
    except AssertionError as e:
        raise AssertionError(f"{e}; answers so far: {results}\n{srv.log_tail()}") from None


def test_a_dead_engine_gets_503s_with_the_reason(tmp_path):
    """With ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1`` the server stays up: health, requests in
    flight, new plain and steered requests and remote traces all answer 503."""
    srv = _start(tmp_path, {"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    try:
        results: dict = {}
        streaming = threading.Event()
        threads = [_in_flight(srv, results, "whole", {**LONG, "interventions": STEER}),
                   _in_flight(srv, results, "stream", {**LONG, "stream": True}, streaming)]
        _wait_running(srv, 1, results, len(threads))   # (the steered one: it has state)
        assert streaming.wait(120), results            # (the stream: its first token is out)
        _kill_engine_core(srv)
        for t in threads:
            t.join(60)
        status, text = results["whole"]
        assert status == 503 and "engine stopped" in text, results
        status, text = results["stream"]    # 200 was sent before: the error is an event
        assert status == 200 and '"error"' in text, results

        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unavailable"
        assert int(health.headers["retry-after"]) > 0
        stats = httpx.get(srv.url + "/v1/stats")   # (a route with no error handling of its own)
        assert stats.status_code == 503 and "engine stopped" in stats.text, stats.text
        for body in ({**LONG, "max_tokens": 3}, {**LONG, "max_tokens": 3, "stream": True},
                     {**LONG, "max_tokens": 3, "interventions": STEER}):
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 503, r.text
            assert "engine stopped" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) > 0

        from vinterp import LanguageModel

        lm = LanguageModel(MODEL, backend="remote", host=srv.url, api_key=KEYS["alice"])
        with pytest.raises(RemoteError, match="engine stopped") as err:
            with lm.trace("Hello"):
                lm.layers[1].output.save()
        assert err.value.status == 503
        assert srv.proc.poll() is None, "the server exited although asked to stay up"
    finally:
        srv.stop(timeout=30)


def test_the_server_exits_1_when_its_engine_dies(tmp_path):
    """The default: a server whose engine died stops, exit code 1, for its supervisor."""
    srv = _start(tmp_path)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        _kill_engine_core(srv)
        code = srv.proc.wait(60)
    finally:
        srv.stop(timeout=30)
    assert code == 1, srv.log_tail()
    assert "the engine died" in srv.log_tail()
