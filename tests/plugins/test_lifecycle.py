"""Request lifecycle in the plugin: preemption and recomputation, aborts, bounded state, async.

The engine here has a KV cache of a few hundred tokens and many concurrent sequences, so vLLM
preempts running requests and later recomputes them from scratch. Vectorized requests re-apply
their steering on the recomputed rows (the KV must be rebuilt as it was) and skip captures of
positions already captured; general graphs cannot be replayed mid-request and are rerun alone
by the client. Either way the caller sees the results of an unpreempted run.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import rel_err, worker_stats

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402
from vinterp_vllm.payload import outcomes_from_wire  # noqa: E402

#: tiny-llama: 2 layers x 2 KV heads x 32 dims x (K, V) x fp32 = 1 KiB per token; vLLM's CPU
#: blocks hold 128 tokens: 3 blocks, and every request (~100 prompt tokens + 40 new) needs 2.
KV_BYTES = 3 * 128 * 1024
PROMPTS = [f"Story {i}: " + "once upon a time there was a " * 14 for i in range(6)]


@pytest.fixture(scope="session")
def small_kv():
    """tiny-llama whose KV cache holds 384 tokens: 6 requests x ~140 tokens must preempt."""
    lm = LanguageModel("tiny-llama", backend="vllm", kv_cache_memory_bytes=KV_BYTES,
                       max_model_len=256, max_num_seqs=64, enable_prefix_caching=False)
    scheduler = lm._backend.llm.llm_engine.engine_core.engine_core.scheduler
    count = {"n": 0}
    original = scheduler._preempt_request

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    backend = lm._backend
    generate = backend._generate

    def counting_generate(jobs, *args, **kwargs):
        count["generate_calls"] = count.get("generate_calls", 0) + 1
        return generate(jobs, *args, **kwargs)

    backend._generate = counting_generate
    return lm, count   # never closed (see conftest): closing breaks the other engines


def _run(lm, prompts: list[str], vectors: list[torch.Tensor], general: list[bool]):
    """Greedy 40 tokens; each prompt steered by its vector at layer 1 and capturing per step.

    ``general[k]``: request ``k`` uses a graph the vectorized path cannot serve (a write
    computed from the value itself; ``x[:] = x + v`` is a vectorized idiom since 72d867a), so
    it runs on the per-request interpreter.
    """
    caps = []
    with lm.generate(max_new_tokens=40, ignore_eos=True) as tracer:
        for p, v, gen in zip(prompts, vectors, general, strict=True):
            with tracer.invoke(p):
                steps = list().save()
                with tracer.all():
                    out = lm.layers[1].output
                    if gen:
                        lm.layers[1].output[:] = out + out.abs().mean(-1, keepdim=True) * v
                    else:
                        out.steer(v)
                    steps.append(lm.layers[0].output)
                caps.append(steps)
    return [t.tolist() for t in tracer.result], caps


def test_preempted_requests_equal_alone(small_kv):
    lm, preemptions = small_kv
    g = torch.Generator().manual_seed(3)
    vectors = [torch.randn(64, generator=g) * 4 for _ in PROMPTS]
    general = [k % 3 == 0 for k in range(len(PROMPTS))]
    tokens, caps = _run(lm, PROMPTS, vectors, general)
    assert preemptions["n"] > 0, "the engine should have preempted requests"
    # a preempted general graph was rerun alone by the client (retry_alone)
    assert preemptions["generate_calls"] > 1, "no general request was preempted"
    for k, p in enumerate(PROMPTS):
        before = preemptions["n"]
        alone_tokens, alone_caps = _run(lm, [p], [vectors[k]], [general[k]])
        assert preemptions["n"] == before, "a request alone must fit the KV cache"
        assert tokens[k] == alone_tokens[0], k
        got, want = caps[k], alone_caps[0]
        assert len(got) == len(want) == 40, k
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            assert rel_err(a, b) < 1e-5, k


# ---------------------------------------------------------------------- abort and retention
def _payload_request(engine, req_id: str, ids: list[int], n_new: int = 32) -> None:
    """Add a steered request with a vinterp payload straight to vLLM's engine."""
    from helpers import steer_graph
    from vinterp_vllm.payload import Payload

    from vinterp.backends.vllm.requests import subgraph_json
    from vinterp.backends.vllm.sampling import sampling_params

    graph = steer_graph([ids], [{"layer": 1, "vector": torch.ones(64)}], max_new_tokens=n_new)
    payload = Payload(key=req_id, graph_json=subgraph_json(graph, 0), invoke=0,
                      mode="generate")
    params = sampling_params({"max_new_tokens": n_new, "ignore_eos": True},
                             extra_args=payload.to_extra_args())
    engine.add_request(req_id, {"prompt_token_ids": ids}, params)


def _run_until_done(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_aborted_and_undrained_state_is_bounded(tiny_vllm):
    llm = tiny_vllm.llm
    engine = llm.llm_engine
    base = worker_stats(llm)["states"]
    # an aborted request: its state exists while it runs and goes once released
    _payload_request(engine, "abort-a", list(range(10, 30)))
    for _ in range(3):
        engine.step()
    assert worker_stats(llm)["states"] == base + 1
    engine.abort_request(["abort-a"])
    _run_until_done(engine)
    llm.collective_rpc("vinterp_release", args=(["abort-a"],))
    assert worker_stats(llm)["states"] == base
    # aborted and never-drained requests: the cap bounds what the worker keeps
    llm.collective_rpc("vinterp_set_max_undrained", args=(2,))
    try:
        _payload_request(engine, "abort-b", list(range(40, 60)))
        engine.step()
        engine.abort_request(["abort-b"])
        for k in range(5):
            _payload_request(engine, f"undrained-{k}", list(range(50 + k, 70 + k)), n_new=4)
            _run_until_done(engine)
        _payload_request(engine, "last", list(range(5, 25)), n_new=2)  # one more forward
        _run_until_done(engine)
        stats = worker_stats(llm)
        assert stats["states"] <= base + 3, stats  # the cap (2) + "last", which finished after
        assert stats["evicted"] >= 4, stats
        drained = outcomes_from_wire(llm.collective_rpc(
            "vinterp_drain",
            args=(["abort-b", "undrained-0", "undrained-3", "undrained-4", "last"],))[0])
        # the newest two finished ones at the last forward, and the one still running then
        assert set(drained) == {"undrained-3", "undrained-4", "last"}
        assert drained["last"].error is None
        assert worker_stats(llm)["states"] == base
    finally:
        from vinterp_vllm.request_state import DEFAULT_MAX_UNDRAINED

        llm.collective_rpc("vinterp_set_max_undrained", args=(DEFAULT_MAX_UNDRAINED,))


# ---------------------------------------------------------------------- AsyncLLM
def test_async_llm_concurrent_payloads_drain(tiny_path, tiny_vllm):
    """Concurrent requests through vLLM's ``AsyncLLM`` get their captures via the drain RPC.

    ``AsyncLLM`` always runs the engine core in a separate process in vLLM 0.32 (it builds an
    ``AsyncMPClient`` regardless of ``VLLM_ENABLE_V1_MULTIPROCESSING``), so this also checks
    that outcomes cross vLLM's msgpack RPC intact (``outcomes_to_wire``).
    """
    import asyncio

    from helpers import capture_graph
    from vinterp_vllm.payload import Payload
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vinterp.backends.vllm.engine import engine_kwargs
    from vinterp.backends.vllm.requests import subgraph_json
    from vinterp.backends.vllm.sampling import sampling_params

    prompts = [list(range(10 + k, 20 + 3 * k)) for k in range(6)]
    graph, saves = capture_graph(prompts, ["model.layers.1", "model.norm"], mode="generate",
                                 generation={"max_new_tokens": 4})
    want = tiny_vllm.run(graph)

    async def run() -> list:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
            tiny_path, kv_cache_memory_bytes=2**28, max_model_len=256)))
        try:
            await engine.collective_rpc("vinterp_install", args=("llama",))

            async def one(k: int) -> tuple[list[int], object]:
                p = Payload(key=f"async-{k}", graph_json=subgraph_json(graph, k), invoke=k,
                            mode="generate")
                params = sampling_params({"max_new_tokens": 4}, extra_args=p.to_extra_args())
                async for out in engine.generate({"prompt_token_ids": prompts[k]}, params,
                                                 request_id=f"req-{k}"):
                    final = out
                wire = (await engine.collective_rpc("vinterp_drain", args=([p.key],)))[0]
                return list(final.outputs[0].token_ids), outcomes_from_wire(wire)[p.key]

            return await asyncio.gather(*(one(k) for k in range(len(prompts))))
        finally:
            engine.shutdown()

    results = asyncio.run(run())
    for k, (tokens, outcome) in enumerate(results):
        assert outcome.error is None, outcome.error
        assert prompts[k] + tokens == want.generated[k].tolist()
        for sid in saves[2 * k: 2 * k + 2]:
            got = outcome.saves[sid]
            assert got.shape == want.saves[sid].shape
            assert rel_err(got, want.saves[sid]) < 1e-4, (k, sid)


def test_closing_one_engine_leaves_the_others_in_the_process_working(tiny_vllm):
    """Engines in one process share vLLM's parallel groups; closing one used to destroy them,
    and the next forward of any other failed ("pipeline model parallel group is not
    initialized")."""
    import gc

    from vllm import SamplingParams

    other = LanguageModel("tiny-llama", backend="vllm", max_model_len=128, max_num_seqs=4,
                          kv_cache_memory_bytes=2**26)
    with other.trace("Hello there"):
        h = other.model.layers[0].output.save()
    assert h.shape[-1] == 64
    other._backend.close()
    del other
    gc.collect()
    out = tiny_vllm.llm.generate(["Hello there"], SamplingParams(max_tokens=3, temperature=0.0,
                                                                 ignore_eos=True),
                                 use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


# ---------------------------------------------------------------------- a late stop
def _capture_request(engine, req_id: str, ids: list[int], general: bool) -> None:
    """A request saving layer 1's output at every step: the fast path's capture, or (general)
    a save of a value computed from it, which only the graph runner can do."""
    from vinterp_vllm.payload import Payload

    from vinterp.backends.vllm.requests import subgraph_json
    from vinterp.backends.vllm.sampling import sampling_params
    from vinterp.ir import Graph, Invoke, Node, Ref, Steps

    every = Steps(start=0, stop=None)
    read = Node(id=0, op="read", kwargs={"module": "model.layers.1", "kind": "output"},
                steps=every)
    nodes = [read, Node(id=1, op="save", args=(Ref(ref=0),), steps=every)]
    if general:
        nodes = [read, Node(id=2, op="mul", args=(Ref(ref=0), 2.0), steps=every),
                 Node(id=1, op="save", args=(Ref(ref=2),), steps=every)]
    graph = Graph(mode="generate", invokes=(Invoke(prompts=(tuple(ids),)),),
                  nodes=tuple(nodes), generation={"max_new_tokens": 8})
    payload = Payload(key=req_id, graph_json=subgraph_json(graph, 0), invoke=0,
                      mode="generate")
    params = sampling_params({"max_new_tokens": 8, "ignore_eos": True},
                             extra_args=payload.to_extra_args())
    engine.add_request(req_id, {"prompt_token_ids": ids}, params)


@pytest.mark.parametrize("general", [False, True], ids=["fast", "general"])
def test_forwards_past_the_last_counted_token_are_left_out(tiny_vllm, general):
    """vLLM notices a stop string in its front end, after the engine core may already have
    run the forward over the token that completed it. The caller says how many tokens the
    request generated; captures and saves of later forwards are left out (they used to come
    back as one row too many). Here the request runs 8 forwards and the drain counts 5."""
    llm = tiny_vllm.llm
    engine = llm.llm_engine
    ids = list(range(30, 42))
    tag = "general" if general else "fast"
    _capture_request(engine, f"late-stop-{tag}", ids, general)
    _capture_request(engine, f"whole-{tag}", ids, general)
    _run_until_done(engine)
    got = outcomes_from_wire(llm.collective_rpc(
        "vinterp_drain", args=([f"late-stop-{tag}", f"whole-{tag}"], True,
                               {f"late-stop-{tag}": 5}))[0])
    whole, cut = got[f"whole-{tag}"], got[f"late-stop-{tag}"]
    assert whole.error is None and cut.error is None, (whole.error, cut.error)
    full, kept = whole.saves[1], cut.saves[1]
    assert len(full) == 8 and len(kept) == 5     # step 0 (the prompt) + steps 1..4
    for a, b in zip(kept, full, strict=False):
        assert torch.equal(a, b)


def test_streamed_steps_wait_for_the_token_after_them(tiny_vllm):
    """``take_steps`` with ``before=k`` hands over only steps < k: the forward over the newest
    token counts only once a token follows it."""
    from vinterp_vllm.wire import unpack

    llm = tiny_vllm.llm
    engine = llm.llm_engine
    ids = list(range(50, 60))
    _capture_request(engine, "stream-before", ids, general=False)
    for _ in range(5):   # the prompt's forward and four decode steps: steps 0..4 captured
        engine.step()
    assert engine.has_unfinished_requests()
    taken = unpack(llm.collective_rpc("vinterp_take_steps",
                                      args=(["stream-before"], {"stream-before": 3}))[0])
    steps = [s for s, _ in taken["stream-before"][1]]
    assert steps == [0, 1, 2]
    _run_until_done(engine)
    rest = outcomes_from_wire(llm.collective_rpc(
        "vinterp_drain", args=(["stream-before"], True, {"stream-before": 8}))[0])
    assert len(rest["stream-before"].saves[1]) == 5    # steps 3..7
