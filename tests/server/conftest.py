"""One real ``vinterp serve`` (smollm2-135m) on a loopback port for all server tests.

It runs as a child process, exactly as users start it, with these API keys: ``alice`` and
``bob`` (default limits), ``tight`` (small limits, for the 429 tests), ``streamer`` (a small
token budget, spent by one stream), ``queued`` (one request at a time, small captures: remote
traces that do not block), ``sessions`` (a budget of one 9-token prompt) and ``charged``
(the same budget, small captures: a trace that fails is charged) and ``beams`` (60 tokens a
minute, spent by one beam search). Tests reach it with
httpx and the official ``openai`` client. A local vLLM backend on the same model is the
reference for values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_helpers import KEYS, MAX_BODY, MAX_MODEL_LEN, MODEL

from vinterp_server.process import ServerProcess, launch, serve_command


class Served:
    """The running server: its URL, keys and a few helpers."""

    def __init__(self, process: ServerProcess) -> None:
        self.process = process
        self.url = process.url

    def client(self, who: str = "alice", **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def openai(self, who: str = "alice"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS[who], max_retries=0)

    def stats(self) -> dict[str, int]:
        with self.client() as c:
            return c.get("/v1/stats").json()


def start_server(tmp: Path, *extra: str, timeout: float = 240) -> ServerProcess:
    """``vinterp serve`` on smollm2-135m with the tests' keys and limits (``extra``: more
    options, e.g. Ray Serve's)."""
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEYS['alice']} alice\n{KEYS['bob']} bob\n"
                    f"{KEYS['tight']} tight concurrent=1 tokens_per_minute=400 "
                    f"capture_bytes=20000 graph_nodes=8\n"
                    f"{KEYS['streamer']} streamer tokens_per_minute=200\n"
                    f"{KEYS['queued']} queued concurrent=1 capture_bytes=20000\n"
                    f"{KEYS['sessions']} sessions tokens_per_minute=9\n"
                    f"{KEYS['charged']} charged tokens_per_minute=9 capture_bytes=20000\n"
                    f"{KEYS['beams']} beams tokens_per_minute=60\n")
    return launch(serve_command(MODEL, "--api-keys", str(keys), "--max-model-len",
                                str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY),
                                "--inline-capture-bytes", "65536", *extra),
                  log=tmp / "server.log", timeout=timeout)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The shared server (started once per test session)."""
    process = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield Served(process)
    finally:
        process.stop()


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
