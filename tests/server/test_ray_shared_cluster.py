"""``vinterp serve --ray-address`` on a Ray cluster someone else runs, with an app of its own on
Ray Serve: vinterp must not take it over or take it down.

Serve keeps the HTTP host and port it was first started with, so vinterp would answer on the
other app's port, not on ``--port`` (it printed ``ready on`` the port it was asked for), and its
``serve.shutdown()`` at exit deleted every app on the cluster. Now it refuses, before any
engine starts, and leaves the other app running. Also: a model name vinterp does not know is
refused at once under ``--ray`` too (it took a Ray deployment failure, ~50 s, that never named
the model).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from vinterp_server.process import serve_command

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def other_app() -> Iterator[tuple[str, str]]:
    """A local Ray cluster whose Serve runs an app ``other``: (cluster address, app URL)."""
    ctx = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        def other() -> str:
            return "other app ok"

        serve.run(other.bind(), name="other", route_prefix="/other")
        yield ctx.address_info["gcs_address"], f"http://127.0.0.1:{port}/other"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_cluster_serving_elsewhere_is_refused_and_left_running(other_app):
    address, url = other_app
    assert httpx.get(url, timeout=30).text == "other app ok"
    start = time.monotonic()
    proc = subprocess.run(serve_command("smollm2-135m", "--ray-address", address, "--port",
                                        str(_free_port())),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "already answers HTTP on 127.0.0.1:" in proc.stderr
    assert "ready on" not in proc.stderr
    assert time.monotonic() - start < 120        # refused before any engine replica started
    assert httpx.get(url, timeout=30).text == "other app ok"
    assert set(serve.status().applications) == {"other"}


def test_an_unknown_model_is_refused_before_ray_starts():
    start = time.monotonic()
    proc = subprocess.run(serve_command("tiny-lama", "--ray"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model 'tiny-lama' is neither a known vinterp model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60
