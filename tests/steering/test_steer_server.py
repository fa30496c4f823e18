"""Steering against a real ``vinterp serve`` (tiny-llama): a sweep through the server equals
the same sweep on the local vLLM backend, training through remote traces equals training
locally, and an uploaded SteeringVector steers OpenAI completions as it does a local trace."""

from __future__ import annotations

import json
import math
import os

import httpx
import pytest
import torch

from vinterp.steering import SteeringVector, train_vector
from vinterp.steering.datasets import ab_questions, neutral_prompts, sentiment_pairs

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vinterp_server.process import launch, serve_command

    log = tmp_path_factory.mktemp("steer-server") / "server.log"
    proc = launch(serve_command(MODEL, "--max-model-len", "256"), log=log)
    try:
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def local():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vinterp import LanguageModel

    return LanguageModel(MODEL, backend="vllm", max_model_len=256)


@pytest.fixture(scope="module")
def vector(local):
    pos, neg = sentiment_pairs()
    return train_vector(local, pos[:8], neg[:8], layers=[0, 1])


def test_remote_training_equals_local(server, local, vector):
    pos, neg = sentiment_pairs()
    remote = train_vector(local, pos[:8], neg[:8], layers=[0, 1], remote=server)
    for i in (0, 1):
        assert torch.allclose(remote[i], vector[i], rtol=1e-4, atol=1e-5)
    assert remote.prompts_hash == vector.prompts_hash


def _cells(out):
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((out / "cells").iterdir())}


def test_server_sweep_equals_local_sweep(server, local, vector, tmp_path):
    from vinterp.evals import sweep

    kw = dict(layers=[0, 1], scales=[-6.0, 0.0, 6.0], prompts=neutral_prompts()[:3],
              ab_questions=ab_questions()[:3], max_tokens=6, progress=False, plots=False)
    via_server = sweep(server, vector, out_dir=tmp_path / "server", batch_cells=2, **kw)
    via_local = sweep(local, vector, out_dir=tmp_path / "local", **kw)
    assert len(via_server) == len(via_local) == 6
    a, b = _cells(tmp_path / "server"), _cells(tmp_path / "local")
    assert a.keys() == b.keys()
    steered_differs = False
    for name in a:
        for ra, rb in zip(a[name], b[name], strict=True):
            if ra["type"] == "generation":
                assert ra["tokens"] == rb["tokens"] and ra["text"] == rb["text"], name
                steered_differs |= "S+0.0." not in name and ra["tokens"] != a[
                    name.replace(name[3:], "_S+0.0.jsonl")][ra["index"] + 3]["tokens"]
            for m in ("ab", "behavior", "fluency"):
                if m in ra and ra["type"] != "summary":
                    assert math.isclose(ra[m], rb[m], rel_tol=1e-4, abs_tol=1e-4), (name, m)
                elif m in ra:
                    assert ra[m]["mean"] == pytest.approx(rb[m]["mean"], rel=1e-4, abs=1e-4)
    assert steered_differs          # the grid really steered something


def test_uploaded_vector_steers_openai_completions(server, local, vector):
    vector.upload(server, "happy")
    prompt = "The weather this week has been"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "interventions": vector.interventions(6.0, name="happy", layers=[1])}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]["text"]
    with local.generate(prompt, max_new_tokens=6) as tracer:
        with tracer.all():
            vector.apply(local, scale=6.0, layers=[1], positions="all")
    ids = tracer.result[0].tolist()
    n = len(local.tokenizer(prompt)["input_ids"])
    assert served == local.tokenizer.decode(ids[n:])
    with local.generate(prompt, max_new_tokens=6) as plain:
        pass
    assert plain.result[0].tolist() != ids          # it did steer
    # inline values (no upload) give the same text
    body["interventions"] = vector.interventions(6.0, layers=[1])
    r2 = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert r2.json()["choices"][0]["text"] == served
    assert SteeringVector.load  # the file format is the upload format (see test_vectors)
