"""One real ``vinterp serve`` (smollm2-135m) on a loopback port for all server tests.

It runs as a child process, exactly as users start it, with three API keys: ``alice`` and
``bob`` (default limits) and ``tight`` (small limits, for the 429 tests). Tests reach it with
httpx and the official ``openai`` client. A local vLLM backend on the same model is the
reference for values.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_helpers import KEYS, MAX_BODY, MAX_MODEL_LEN, MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The running server: its URL, keys and a few helpers."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def client(self, who: str = "alice", **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def openai(self, who: str = "alice"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS[who], max_retries=0)

    def stats(self) -> dict[str, int]:
        with self.client() as c:
            return c.get("/v1/stats").json()


def start_server(tmp: Path, extra: list[str] | None = None) -> Served:
    """Start ``vinterp serve`` and wait until ``/health`` answers."""
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEYS['alice']} alice\n{KEYS['bob']} bob\n"
                    f"{KEYS['tight']} tight concurrent=1 tokens_per_minute=400 "
                    f"capture_bytes=20000 graph_nodes=8\n")
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [sys.executable, "-m", "vinterp.cli", "serve", "--model", MODEL, "--port", str(port),
           "--api-keys", str(keys), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-body-bytes", str(MAX_BODY), "--inline-capture-bytes", "65536",
           *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vinterp serve exited ({proc.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Served(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"vinterp serve did not answer in 240 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful), then SIGKILL the whole process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The shared server (started once per test session)."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        stop_server(srv.proc)


@pytest.fixture(scope="session")
def local_vllm():
    """smollm2-135m on the local vLLM backend: the reference for the server's values."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vinterp import LanguageModel

    return LanguageModel(MODEL, backend="vllm", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from vinterp.models.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MODEL))
