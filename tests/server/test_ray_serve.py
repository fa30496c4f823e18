"""The same app on Ray Serve: ``vinterp serve --replicas 2 --ingress-replicas 2`` (a real
local Ray cluster, two replicas of the app sharing per-key state through two store actors, in
front of two engine replicas, Ray Serve's HTTP proxy on loopback).

The single-process server's own tests run here unchanged against it (they are the
specification of the API), plus what only a replicated deployment has: requests spread over
both replicas with each one's own interventions, stats and metrics gathered from every
replica, an engine replica replaced after its engine dies. The key tests (limits, traces
polled later, stored captures) pass only if both ingresses see the same per-key state.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
from collections.abc import Iterator

import pytest
import test_auth_limits as auth
import test_openai_fields as fields
import test_remote_sessions as sessions
import test_remote_traces as traces
import test_samples as samples
import torch
from conftest import Served, start_server
from server_helpers import (KEYS, MODEL, engine_cores, rel, scrape, settled, values,
                            wait_until)

pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``vinterp serve --replicas 2 --ingress-replicas 2`` (started for this module, stopped
    after it)."""
    process = start_server(tmp_path_factory.mktemp("ray-server"), "--replicas", "2",
                           "--ingress-replicas", "2",
                           "--kv-cache-memory-bytes", str(256 * 2**20), timeout=780)
    # (the start stays under pytest's 900 s per test, which counts this fixture's setup: a
    # start cut short by pytest would leave the cluster running)
    try:
        yield Served(process)
    finally:
        # (replicas get 30 s to finish their requests, then Ray tears the cluster down)
        assert process.stop(timeout=180) == 0, process.log_tail()
        assert "Traceback" not in process.log.read_text(), process.log_tail()


def test_captures_and_steering_equal_the_local_backend(ray_served, local_vllm, tokenizer):
    fields.test_capture_equals_local_vllm_backend(ray_served, local_vllm)
    fields.test_steered_generation_captures_every_step_like_local(ray_served, local_vllm,
                                                                  tokenizer)
    fields.test_graph_field_runs_the_library_ir(ray_served, local_vllm)


def test_streamed_and_stored_captures(ray_served):
    fields.test_chat_stream_carries_captures_chunk_by_chunk(ray_served)
    fields.test_large_captures_are_stored_and_fetched_by_their_owner_only(ray_served)
    samples.test_samples_equal_vllm_parallel_sampling_and_one_sample_requests(ray_served)
    samples.test_streamed_samples_carry_their_own_captures(ray_served)


def test_remote_traces_and_sessions(ray_served, local_vllm, monkeypatch):
    traces.test_seed_patching_example_remote_equals_local(ray_served, local_vllm, monkeypatch)
    traces.test_remote_generate_and_non_blocking(ray_served, local_vllm)
    traces.test_a_trace_failing_at_run_time_says_why(ray_served, local_vllm)
    sessions.test_remote_session_is_one_request_with_local_values(ray_served, local_vllm,
                                                                  monkeypatch)
    # admission and charges live in the ingresses and their shared store, as in one process
    traces.test_a_non_blocking_trace_is_admitted_before_its_202(ray_served, local_vllm)
    sessions.test_a_session_is_admitted_and_charged_once(ray_served, local_vllm)


def test_keys_limits_and_bad_input(ray_served):
    """Keys, per-key limits and 4xx answers live in the ingresses: the same as one process
    (a key's requests in flight and tokens per minute counted over both)."""
    auth.test_every_route_but_health_and_metrics_needs_a_key(ray_served, "wrong")
    auth.test_traces_and_captures_are_per_key(ray_served)
    auth.test_bad_bodies(ray_served)
    auth.test_limits_answer_413_for_size_and_429_with_retry_after_for_rate(ray_served)
    auth.test_streamed_tokens_count_against_the_budget(ray_served)
    for case in auth.BAD_FIELDS:
        auth.test_bad_fields_get_400_naming_the_field(ray_served, *case)


def test_concurrent_requests_spread_over_both_replicas(ray_served, local_vllm, tokenizer):
    """Sixteen concurrent requests, each with its own vector: both replicas serve some, each
    answer equals the local backend's for that request alone, and no state is left."""
    prompts = [f"Story {i}: once upon a time" for i in range(16)]
    vecs = [torch.randn(576, generator=torch.Generator().manual_seed(i)) * 4
            for i in range(16)]
    before = ray_served.stats()["per_replica"]
    requests_before = _metric(ray_served, "vinterp_requests_total")

    def one(i: int) -> str:
        return ray_served.openai("bob").completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=5, temperature=0,
            extra_body={"interventions": [{"op": "steer", "layers": [6], "positions": "all",
                                           "vector": values(vecs[i])}]}).choices[0].text

    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    for i in (0, 7, 15):
        with local_vllm.generate(prompts[i], max_new_tokens=5) as tr:
            with tr.all():   # the server's steering applies at every step
                local_vllm.layers[6].output.steer(vecs[i], positions="all")
        n = len(tokenizer.encode(prompts[i]))
        assert texts[i] == tokenizer.decode(tr.result[0][n:]), i
    assert len(set(texts)) > 1
    after = settled(ray_served)
    assert after["replicas"] == 2 and len(after["per_replica"]) == 2
    took = {r["replica_id"]: r["requests"] for r in after["per_replica"]}
    for r in before:
        took[r["replica_id"]] -= r["requests"]
    served = list(took.values())
    assert sum(served) == 16 and all(n > 0 for n in served), served
    assert after["compilation"] != "NONE"   # the replicas run vLLM compiled, as by default
    metrics = scrape(ray_served.url)
    assert "vllm:generation_tokens_total" in metrics
    assert set(took) == set(re.findall(r'replica="([^"]+)"', metrics))
    # every ingress's counters, whichever ingress the scrape reaches
    assert len(set(re.findall(r'ingress="([^"]+)"', metrics))) == 2
    for _ in range(4):
        assert _metric(ray_served, "vinterp_requests_total") - requests_before == 16


def test_client_gone_mid_stream_stops_the_request_on_its_replica(ray_served):
    """A streaming client that hangs up: the ingress cancels the replica's call, and the
    engine aborts the request instead of generating its remaining ~470 tokens."""
    before = _generated(ray_served)
    with ray_served.client("alice") as c:
        with c.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "Count:", "max_tokens": 480, "ignore_eos": True,
                "stream": True, "capture": [{"point": "layers.3.output", "steps": "all"}]}) as r:
            assert r.status_code == 200
            for _ in zip(range(4), r.iter_lines()):
                pass
    settled(ray_served)
    deadline = time.monotonic() + 30
    while _running(ray_served) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(ray_served) == 0
    assert _generated(ray_served) - before < 240   # stopped early, not run to 480 tokens


def _metric(served: Served, name: str) -> float:
    """A metric's sum over its samples (every replica's) in ``/metrics``."""
    total = 0.0
    for line in scrape(served.url).splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _generated(served: Served) -> float:
    return _metric(served, "vllm:generation_tokens_total")


def _running(served: Served) -> float:
    return _metric(served, "vllm:num_requests_running")


def test_per_key_state_is_shared_by_both_ingresses(ray_served):
    """A vector stored through whichever ingress took the PUT is there for every later GET,
    whichever ingress Ray's proxy picks (each GET picks anew: with state per ingress about
    half of them would answer 404)."""
    from safetensors.torch import save

    vec = torch.randn(576)
    with ray_served.client("alice") as c:
        assert c.put("/v1/vectors/shared", content=save({"v": vec})).status_code == 201
        codes = [c.get("/v1/vectors/shared").status_code for _ in range(16)]
        assert codes == [200] * 16
        assert c.delete("/v1/vectors/shared").status_code in (200, 204)


def test_the_shared_store_comes_back_after_its_process_dies(ray_served):
    """Kill the store actors' processes (one per ingress by default, each holding some keys):
    Ray starts them again (empty), and the keys, limits and vectors work through both
    ingresses as before."""
    import psutil
    from safetensors.torch import save

    stores = [p for p in psutil.process_iter(["cmdline"])
              if "ray::MemoryStore" in " ".join(p.info["cmdline"] or ())]
    assert len(stores) == 2, "the two store shards' processes were not found"
    for store in stores:
        store.kill()

    def back() -> bool:   # (each key's shard answers: Ray restarted both actors)
        for who in ("alice", "tight"):
            with ray_served.client(who) as c:
                if c.get("/v1/vectors", timeout=30).status_code != 200:
                    return False
        return True

    # (a loaded machine can take longer to restart an actor than one store call may wait)
    wait_until(back, "the store actors restarted", timeout=120, every=0.5)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    with ray_served.client("alice") as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.put("/v1/vectors/again", content=save({"v": torch.randn(576)})
                     ).status_code == 201
        assert [c.get("/v1/vectors/again").status_code for _ in range(8)] == [200] * 8
    with ray_served.client("tight") as c:   # a limit still holds (tokens_per_minute=400)
        codes = [c.post("/v1/completions", json={**body, "max_tokens": 60,
                                                  "ignore_eos": True}).status_code
                 for _ in range(12)]   # (60 tokens each, whatever is sampled: 400 spent)
    assert 429 in codes and codes[0] == 200, codes


def test_a_replica_whose_engine_dies_is_replaced(ray_served):
    """Kill one replica's engine core. Requests sent at once, while Ray Serve still routes to
    that replica, are retried on the other one: every answer is right, none fails. Then its
    health check fails, Ray Serve starts a new replica, and the deployment serves steered
    requests correctly again on two replicas. (Runs last: the other tests need both replicas
    up.)"""
    vec = torch.randn(576, generator=torch.Generator().manual_seed(5)) * 4
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
            "interventions": [{"op": "steer", "layers": [6], "vector": values(vec)}]}
    with ray_served.client("bob") as c:
        want = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        plain = c.post("/v1/completions", json={**body, "interventions": None}).json()
    assert want != plain["choices"][0]["text"]
    from vinterp import LanguageModel

    lm = LanguageModel(MODEL, backend="remote", host=ray_served.url, api_key=KEYS["bob"])

    def remote_trace() -> torch.Tensor:
        with lm.trace(traces.EIFFEL):
            out = lm.layers[6].output.save()
        return out

    want_trace = remote_trace()

    def answer(i: int) -> tuple[int, str]:
        with ray_served.client("alice") as c:
            if i % 2:
                r = c.post("/v1/completions", json=body)
                return r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
            return r.status_code, "".join(json.loads(e)["choices"][0]["text"]
                                          if '"error"' not in e else e for e in events)

    retries = _metric(ray_served, "vinterp_replica_retries_total")
    victim = ray_served.stats()["per_replica"][0]
    cores = engine_cores(victim["pid"])
    assert cores, "the replica's engine core process was not found"
    for c in cores:
        c.kill()
    with cf.ThreadPoolExecutor(8) as pool:
        answers = pool.map(answer, range(16))
        traced = [remote_trace() for _ in range(3)]   # (meanwhile, from here)
        answers = list(answers)
    assert answers == [(200, want)] * 16
    # (run next to other requests: another batch shape, rounding apart by ~1e-6)
    assert all(rel(t, want_trace) <= 1e-4 for t in traced)
    assert _metric(ray_served, "vinterp_replica_retries_total") > retries   # (some were)
    with ray_served.client("alice") as c:
        assert c.get("/health").status_code == 200   # the other replica serves

    deadline = time.monotonic() + 600
    while True:
        stats = ray_served.stats()
        ids = [r.get("replica_id") for r in stats["per_replica"]]
        if victim["replica_id"] not in ids and stats["replicas"] == 2 and not stats["failing"]:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(2)
    with ray_served.client("bob") as c:
        texts = {c.post("/v1/completions", json=body).json()["choices"][0]["text"]
                 for _ in range(6)}
    assert texts == {want}
