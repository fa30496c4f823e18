"""A failing intervention fails only its own request; the engine and its neighbours go on."""

from __future__ import annotations

import pytest
import torch
from helpers import capture_graph, steer_graph

from vinterp.backends.vllm.runs import GraphRun
from vinterp.ir import Graph, Invoke, Node, Ref, SliceV, TensorRef, TupleV, encode_tensor
from vinterp.ir.errors import InterventionError
from vinterp_vllm.payload import outcomes_from_wire


def _one_batch(backend, graphs: dict[str, Graph]) -> dict[str, GraphRun]:
    """Every graph's requests in one ``llm.generate`` call (one continuous batch)."""
    runs = {tag: GraphRun(g, f"faults-{tag}") for tag, g in graphs.items()}
    jobs = [(run, job) for run in runs.values() for job in next(run.phases())]
    requests = [run.request(job) for run, job in jobs]
    outs = backend.llm.generate([p for p, _ in requests], [sp for _, sp in requests],
                                use_tqdm=False)
    drained = outcomes_from_wire(backend.llm.collective_rpc(
        "vinterp_drain", args=([job.payload.key for _, job in jobs],))[0])
    for (run, job), out in zip(jobs, outs, strict=True):
        run.record(job, drained.get(job.payload.key), out.outputs[0].token_ids)
    return runs


def _bad_setitem(prompt: list[int]) -> Graph:
    # layer 0 output [1, n, 64] gets a [3, 5] value: a shape mismatch at run time
    return Graph(invokes=(Invoke(prompts=(tuple(prompt),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
        Node(id=1, op="setitem", args=(Ref(ref=0), TupleV(tuple=()), TensorRef(tensor=0))),
        Node(id=2, op="save", args=(Ref(ref=0),)),
    ), tensors=(encode_tensor(torch.ones(3, 5)),))


def test_bad_requests_fail_alone(tiny_vllm):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    good = steer_graph(prompts, [{"layer": 1, "vector": torch.ones(64), "scale": 2.0}, None],
                       max_new_tokens=4)
    wrong_size = steer_graph([prompts[0]], [{"layer": 0, "vector": torch.ones(7)}],
                             max_new_tokens=4)
    runs = _one_batch(tiny_vllm, {"good": good, "size": wrong_size,
                                  "shape": _bad_setitem(prompts[1])})
    assert "hidden size is 64" in runs["size"].outcomes[(0, 0)].error
    assert "cannot assign a value of shape [3, 5]" in runs["shape"].outcomes[(0, 0)].error
    assert runs["good"].outcomes[(0, 0)].error is None
    assert runs["good"].outcomes[(1, 0)].error is None
    alone = tiny_vllm.run(good)
    assert [t.tolist() for t in runs["good"].result().generated] == \
        [t.tolist() for t in alone.generated]
    # the trace that failed raises a clear error; the engine still serves the next one
    with pytest.raises(InterventionError, match="cannot assign"):
        tiny_vllm.run(_bad_setitem(prompts[1]))
    graph, saves = capture_graph([prompts[0]], ["model.layers.1"])
    assert tiny_vllm.run(graph).saves[saves[0]].shape == (1, 5, 64)


@pytest.mark.parametrize("entry,message", [
    ("x", "must be a dict"),
    ({"graph": "{}"}, "['key'] must be a non-empty string"),
    ({"key": "faults-bad", "graph": "{}", "invoke": "x"}, "['invoke'] must be a non-negative int"),
    ({"key": "faults-bad", "graph": "{}", "capture_cap": 1.5}, "['capture_cap'] must be"),
    ({"key": "faults-bad", "graph": "{}", "exports": ["a"]}, "['exports'] must be a list of int"),
    ({"key": "faults-bad"}, "['graph'] must be"),
])
def test_a_malformed_payload_fails_alone(tiny_vllm, entry, message):
    """A malformed ``extra_args["vinterp"]`` (any client of a ``vllm serve`` built with the
    plugin can send one) fails its own request with what was wrong; the steered and plain
    requests of its batch finish as they would alone, and the engine keeps serving. It used to
    raise inside the forward: the batch was lost and the in-process engine hung."""
    from vllm import SamplingParams

    from vinterp_vllm.worker import UNKEYED_PREFIX

    good = steer_graph([[5, 6, 7, 8, 9]], [{"layer": 1, "vector": torch.ones(64), "scale": 2.0}],
                       max_new_tokens=4)
    run = GraphRun(good, f"faults-malformed-{message[:8]}")
    (job,) = next(run.phases())
    good_prompt, good_params = run.request(job)
    plain = ({"prompt_token_ids": [10, 11, 12, 13]},
             SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    bad = ({"prompt_token_ids": [20, 21, 22]},
           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                          extra_args={"vinterp": entry}))
    outs = tiny_vllm.llm.generate([good_prompt, plain[0], bad[0]],
                                  [good_params, plain[1], bad[1]], use_tqdm=False)
    keyed = isinstance(entry, dict) and "key" in entry
    if keyed:
        keys = ["faults-bad"]
    else:   # no key to report under: the worker's own request id
        keys = [k for k in tiny_vllm.llm.collective_rpc(
            lambda worker: list(worker._vinterp.by_key))[0] if k.startswith(UNKEYED_PREFIX)]
        assert len(keys) == 1
    drained = outcomes_from_wire(tiny_vllm.llm.collective_rpc(
        "vinterp_drain", args=([job.payload.key, *keys],))[0])
    assert message in drained[keys[0]].error
    assert "malformed vinterp payload" in drained[keys[0]].error
    run.record(job, drained.get(job.payload.key), outs[0].outputs[0].token_ids)
    assert run.outcomes[(0, 0)].error is None
    assert [t.tolist() for t in run.result().generated] == \
        [t.tolist() for t in tiny_vllm.run(good).generated]
    alone = tiny_vllm.llm.generate([plain[0]], [plain[1]], use_tqdm=False)
    assert list(outs[1].outputs[0].token_ids) == list(alone[0].outputs[0].token_ids)
    assert len(outs[2].outputs[0].token_ids) == 4   # the request itself still ran


def test_parallel_sampling_of_one_payload_fails_with_the_reason(tiny_vllm):
    """vLLM's ``n > 1`` gives each sample the parent's payload: one key, two requests' rows.
    The worker cannot tell them apart (the second sample went unsteered and its captures were
    dropped, silently): it fails the request and says what to send instead."""
    prompt = [5, 6, 7, 8, 9, 10, 11]
    graph = steer_graph([prompt], [{"layer": 0, "vector": torch.ones(64), "scale": 2.0}],
                        max_new_tokens=4)
    run = GraphRun(graph, "faults-n2")
    (job,) = next(run.phases())
    prompt_in, params = run.request(job)
    params.n, params.temperature, params.top_k = 2, 1.0, 1
    tiny_vllm.llm.generate([prompt_in], [params], use_tqdm=False)
    drained = outcomes_from_wire(tiny_vllm.llm.collective_rpc(
        "vinterp_drain", args=([job.payload.key],))[0])
    error = drained[job.payload.key].error
    assert "parallel sampling (SamplingParams n > 1)" in error
    assert "or a key reused before its outcome was drained" in error and job.payload.key in error


def test_refusals_at_trace_time(tiny_vllm):
    graph, _ = capture_graph([[5, 6, 7]], ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError, match="not available on the vllm backend"):
        tiny_vllm.check(graph)
    long = _bad_setitem(list(range(3, 60)))  # a general graph, 57 tokens > 32-token chunks
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        tiny_vllm.check(long)


def _inf_write(prompt: list[int], module: str) -> Graph:
    # a general graph: module.output = module.output / zeros(hidden), a division by zero
    return Graph(invokes=(Invoke(prompts=(tuple(prompt),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": module, "kind": "output"}),
        Node(id=1, op="truediv", args=(Ref(ref=0), TensorRef(tensor=0))),
        Node(id=2, op="write", args=(Ref(ref=1),), kwargs={"module": module, "kind": "output"}),
    ), tensors=(encode_tensor(torch.zeros(64)),))


def test_an_intervention_that_overflows_fails_alone_and_poisons_nobody(tiny_vllm):
    """A steering vector whose values overflow (each finite, the sum not) and a graph writing
    inf: each fails with a message saying so, and the requests served after them get exactly
    the tokens and finite logits they got before. Without the guard the inf/NaN rows reached
    the KV cache; its blocks are reused once a request ends, and attention gives a masked
    slot's NaN a zero weight, which is NaN: later, unrelated requests came out NaN."""
    prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12, 13] for i in range(4)]

    def plain() -> tuple[list, list]:
        graph, saves = capture_graph(prompts, ["lm_head"])
        run = tiny_vllm.run(graph)
        tokens = tiny_vllm.run(steer_graph(prompts, [None] * 4, max_new_tokens=6)).generated
        return [t.tolist() for t in tokens], [run.saves[s] for s in saves]

    tokens_before, logits_before = plain()
    huge = torch.full((64,), 3e38)
    prompt = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    runs = _one_batch(tiny_vllm, {
        "steer": steer_graph([prompt], [{"layer": 0, "vector": huge, "scale": 3e38}],
                             max_new_tokens=4),
        "write": _inf_write(prompt[:7], "model.layers.0.mlp"),
        "good": steer_graph(prompts[:2], [None, None], max_new_tokens=4)})
    assert "made this request's activations inf or NaN" in runs["steer"].outcomes[(0, 0)].error
    assert "made model.layers.0.mlp.output inf or NaN" in runs["write"].outcomes[(0, 0)].error
    assert [t.tolist() for t in runs["good"].result().generated] == \
        [t[:len(p) + 4] for t, p in zip(tokens_before[:2], prompts[:2], strict=True)]
    tokens_after, logits_after = plain()
    assert tokens_after == tokens_before
    for a, b in zip(logits_after, logits_before, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def few_blocks():
    """An engine with a KV cache of 16 blocks: a finished request's blocks soon go to the
    next ones (with a large cache a poisoned block comes round only later). Never closed,
    as the conftest's engines (it holds little memory)."""
    from vinterp import LanguageModel

    return LanguageModel("tiny-llama", backend="vllm", block_size=32,
                         kv_cache_memory_bytes=16 * 32 * 1024, enable_prefix_caching=False,
                         max_num_batched_tokens=128, max_num_seqs=16, max_model_len=256)


def _mlp_input_overflow(lm, prompt: list[int]) -> None:
    # finite where it is made (1e20), so the guard at the point passes it; the MLP's
    # gate * up is ~1e40, inf in float32, and layer 1's keys and values come out NaN
    with lm.generate(prompt, max_new_tokens=4):
        lm.model.layers[0].mlp.input.steer(torch.ones(64), scale=1e20)


def _first_input_inf(lm, prompt: list[int]) -> None:
    # layer 0's input: vLLM has no residual there yet, so the graph's value was once a
    # view of vLLM's own tensor and the in-place write went past the guard
    with lm.generate(prompt, max_new_tokens=4):
        x = lm.model.layers[0].input
        x[:] = x / 0


@pytest.mark.parametrize("overflow,message", [
    (_mlp_input_overflow, "became inf or NaN in this request after its intervention"),
    (_first_input_inf, "made model.layers.0.input inf or NaN")])
def test_an_overflow_anywhere_poisons_nobody(few_blocks, overflow, message):
    """The overflowing request fails with a message saying so, and other users' requests
    served after it on the freed blocks get exactly the logits they got before. Without the
    output check (and the KV cache clearing) three of eight came out all NaN."""
    g = torch.Generator().manual_seed(0)
    others = [torch.randint(3, 5000, (9,), generator=g).tolist() for _ in range(8)]

    def logits() -> list[torch.Tensor]:
        with few_blocks.trace() as tracer:
            saved = []
            for p in others:
                with tracer.invoke(p):
                    saved.append(few_blocks.logits.save())
        return saved

    before = logits()
    with pytest.raises(InterventionError, match=message):
        overflow(few_blocks, torch.randint(3, 5000, (100,), generator=g).tolist())
    for a, b in zip(logits(), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["logits", "event"])
def test_a_failure_at_the_logits_point_fails_only_its_request(tiny_vllm, monkeypatch, where):
    """An exception while computing one request's logits (a large whole-prompt logits read
    can run a GPU out of memory) or building its event at the final norm fails that request
    alone; the other logits trace of the batch, a steered request and a plain one finish as
    they would alone. Both sat outside the per-request guard: the whole batch failed."""
    import vinterp_vllm.worker as worker

    victim_len = 11   # the victim's rows are told apart by their prompt length

    def mine(span) -> bool:
        return span.prompt_len == victim_len

    if where == "logits":
        real = worker.batched_logits

        def batched_logits(model, normed, wants):
            if any(mine(span) for span, _, _ in wants):
                raise RuntimeError("simulated: CUDA out of memory in compute_logits")
            return real(model, normed, wants)
        monkeypatch.setattr(worker, "batched_logits", batched_logits)
    else:
        real_event = worker.RowsEvent

        def rows_event(p, span, *args, **kwargs):
            if mine(span):
                raise RuntimeError("simulated: CUDA out of memory in RowsEvent")
            return real_event(p, span, *args, **kwargs)
        monkeypatch.setattr(worker, "RowsEvent", rows_event)

    other = [5, 6, 7, 8, 9, 10, 11]
    victim = list(range(20, 20 + victim_len))
    logits_graph, saves = capture_graph([other], ["lm_head"])
    victim_graph, _ = capture_graph([victim], ["lm_head"])
    steered = steer_graph([[30, 31, 32, 33, 34]],
                          [{"layer": 1, "vector": torch.ones(64), "scale": 2.0}],
                          max_new_tokens=4)
    plain = steer_graph([[40, 41, 42, 43]], [None], max_new_tokens=4)
    runs = _one_batch(tiny_vllm, {"victim": victim_graph, "logits": logits_graph,
                                  "steered": steered, "plain": plain})
    assert "simulated: CUDA out of memory" in runs["victim"].outcomes[(0, 0)].error
    assert runs["logits"].outcomes[(0, 0)].error is None
    assert runs["steered"].outcomes[(0, 0)].error is None
    monkeypatch.undo()
    alone = tiny_vllm.run(logits_graph).saves[saves[0]]
    assert torch.allclose(runs["logits"].result().saves[saves[0]], alone, rtol=1e-5, atol=1e-5)
    for tag, graph in (("steered", steered), ("plain", plain)):
        assert [t.tolist() for t in runs[tag].result().generated] == \
            [t.tolist() for t in tiny_vllm.run(graph).generated]


def _fake_worker(**settings):
    """What ``attach_hooks`` reads of a vLLM worker before it touches the model."""
    from types import SimpleNamespace as NS

    parallel = NS(data_parallel_size=settings.get("data_parallel_size", 1),
                  enable_dbo=settings.get("enable_dbo", False),
                  ubatch_size=settings.get("ubatch_size", 0))
    runner = NS(input_batch=None,
                vllm_config=NS(speculative_config=None, parallel_config=parallel),
                model_config=NS(enable_prompt_embeds=settings.get("enable_prompt_embeds",
                                                                  False)))
    return NS(model_runner=runner)


@pytest.mark.parametrize("settings,message", [
    ({"enable_prompt_embeds": True}, "enable_prompt_embeds=True is not supported"),
    ({"data_parallel_size": 2}, r"data_parallel_size > 1 is not supported"),
    ({"enable_dbo": True}, r"enable_dbo / ubatch_size > 1 \(micro-batching\) is not supported"),
    ({"ubatch_size": 2}, r"enable_dbo / ubatch_size > 1 \(micro-batching\) is not supported"),
])
def test_the_worker_refuses_engine_settings_the_hooks_cannot_serve(settings, message):
    """``vllm serve --worker-extension-cls ...`` builds the engine without vinterp's
    engine_kwargs checks: the worker refuses the same settings, with the same words, when the
    hooks go in. (With enable_prompt_embeds the embedding point never ran in the step: a
    capture there returned another request's rows in tables mode, and "internal error"
    elsewhere.)"""
    from vinterp_vllm.worker import attach_hooks

    with pytest.raises(ValueError, match=message):
        attach_hooks(_fake_worker(**settings))


def test_a_prompt_other_than_the_graphs_fails_with_the_reason(tiny_vllm):
    """A direct caller whose vLLM prompt is longer than the graph's (a chat template, a BOS
    token): ``x[:, -1]`` resolved against the graph's 3 tokens captured row 2 of 6, silently.
    The request now fails saying why; a request sending the graph's own tokens is served."""
    graph = Graph(invokes=(Invoke(prompts=((5, 6, 7),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.1", "kind": "output"}),
        Node(id=1, op="getitem", args=(Ref(ref=0), TupleV(tuple=(SliceV(slice=(None, None,
                                                                         None)), -1)))),
        Node(id=2, op="save", args=(Ref(ref=1),)),
    ))
    run = GraphRun(graph, "faults-prompt-len")
    (job,) = next(run.phases())
    prompt, params = run.request(job)
    prompt["prompt_token_ids"] = [1, 2, 3, 5, 6, 7]
    tiny_vllm.llm.generate([prompt], [params], use_tqdm=False)
    drained = outcomes_from_wire(tiny_vllm.llm.collective_rpc(
        "vinterp_drain", args=([job.payload.key],))[0])
    assert "vLLM runs this request with a 6-token prompt but its graph's invoke 0 has a " \
        "3-token prompt" in drained[job.payload.key].error
    assert tiny_vllm.run(graph).saves[2].shape == (1, 64)
