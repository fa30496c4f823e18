"""Without vinterp fields the server answers exactly as ``vllm serve`` does on the same
model and engine settings: text, token counts and logprobs, streamed or not (ids and
timestamps aside). ``vllm serve`` runs as a child process on its own loopback port."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import KEYS, MAX_MODEL_LEN, MODEL

from vinterp.backends.vllm.engine import default_kv_cache_bytes
from vinterp_server.process import launch, vllm_serve_command

VOLATILE = {"id", "created", "system_fingerprint"}


@pytest.fixture(scope="module")
def plain_vllm(tmp_path_factory, smollm2_path):
    # the engine settings vinterp serve uses (vinterp.backends.vllm.engine.engine_kwargs):
    # both compiled, so plain requests must match bit for bit (the plugin's op in vinterp's
    # graph leaves rows no request touches exactly as plain vLLM computes them)
    cmd = vllm_serve_command(
        str(smollm2_path), "--served-model-name", MODEL, "--host", "127.0.0.1",
        "--dtype", "float32", "--seed", "0",
        "--kv-cache-memory-bytes", str(default_kv_cache_bytes()),
        "--max-model-len", str(MAX_MODEL_LEN))
    process = launch(cmd, log=tmp_path_factory.mktemp("vllm") / "vllm.log",
                     env={"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_PLUGINS": ""})
    yield process.url
    process.stop()


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _post(url: str, path: str, body: dict, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + path, json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return _strip(r.json())
    return _merged([_strip(json.loads(line[6:])) for line in r.text.splitlines()
                    if line.startswith("data: {")])


def _merged(chunks: list[dict]) -> dict:
    """A stream's content, per choice, with chunk boundaries taken out: vLLM sends the tokens
    produced while a slow client was behind as one chunk (" How can I help" against " How",
    " can", ...), so where chunks split depends on timing, not on what the server computed.
    Everything else in the chunks (roles, finish reasons, usage, logprobs) is compared."""
    text: dict[int, str] = {}
    rest: list = []
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            piece = delta.get("content") if "delta" in choice else choice.get("text")
            text[choice["index"]] = text.get(choice["index"], "") + (piece or "")
            other = {k: v for k, v in choice.items() if k not in ("delta", "text")}
            other["delta"] = {k: v for k, v in delta.items() if k != "content"}
            if other.get("finish_reason") or other.get("logprobs") or other["delta"]:
                rest.append(other)
        if chunk.get("usage"):
            rest.append({"usage": chunk["usage"]})
    return {"text": text, "rest": rest}


REQUESTS = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12,
                         "temperature": 0, "logprobs": 3}),
    ("/v1/completions", {"prompt": ["Once upon a time", "Dogs are"], "max_tokens": 8,
                         "temperature": 0, "stop": ["."], "echo": False}),
    ("/v1/completions", {"prompt": "Count: one, two,", "max_tokens": 10, "temperature": 0.8,
                         "top_p": 0.9, "seed": 7, "n": 2}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                         "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a color."}],
                              "max_tokens": 10, "temperature": 0, "logprobs": True,
                              "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi!"}],
                              "max_tokens": 8, "temperature": 0, "stream": True}),
]


@pytest.mark.parametrize("path,body", REQUESTS)
def test_plain_requests_equal_vllm_serve(served, plain_vllm, path, body):
    body = {"model": MODEL, **body}
    ours = _post(served.url, path, body, KEYS["alice"])
    theirs = _post(plain_vllm, path, body)
    assert ours == theirs


def test_models_list_matches(served, plain_vllm):
    ours = httpx.get(served.url + "/v1/models",
                     headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()
    theirs = httpx.get(plain_vllm + "/v1/models").json()
    assert [m["id"] for m in ours["data"]] == [m["id"] for m in theirs["data"]] == [MODEL]
    assert ours["data"][0]["max_model_len"] == theirs["data"][0]["max_model_len"]
