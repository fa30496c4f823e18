"""Whole graphs on the server's shared engine (:meth:`AsyncEngine.run`), a real ``AsyncLLM``.

What a remote trace does to the engine everyone shares: a failing invoke stops its sibling
requests (none is left generating with no slot held), the run's captures are held to one
cap together, and a general graph whose prompt another caller's request split is rerun.
The reference for values is the same graph run alone, with no cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vinterp.backends.vllm.async_engine import AsyncEngine
from vinterp.ir.errors import CaptureLimitError
from vinterp.ir.schema import Graph, Invoke, Node, Ref
from vinterp.models.registry import resolve_model

#: tiny-llama: hidden 64, float32: a saved layer output is 256 bytes per prompt token
HIDDEN_BYTES = 64 * 4


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[asyncio.AbstractEventLoop, AsyncEngine]]:
    """tiny-llama on an ``AsyncLLM`` whose forwards hold 32 tokens (chunked prefill splits
    longer prompts, and prompts that arrive while another one is prefilled), with the loop
    it runs in."""
    loop = asyncio.new_event_loop()
    eng = loop.run_until_complete(AsyncEngine.start(
        resolve_model("tiny-llama"), max_model_len=512, max_num_batched_tokens=32,
        max_num_seqs=16, kv_cache_memory_bytes=2**28, enable_prefix_caching=False))
    try:
        yield loop, eng
    finally:
        loop.run_until_complete(eng.shutdown())
        loop.close()


def _saving_graph(prompts: list[list[int]], module: str = "model.layers.0",
                  **generation: Any) -> Graph:
    """One invoke per prompt, each saving ``module``'s output."""
    nodes = []
    for i in range(len(prompts)):
        nodes += [Node(id=2 * i, op="read", kwargs={"module": module, "kind": "output"},
                       invoke=i),
                  Node(id=2 * i + 1, op="save", args=(Ref(ref=2 * i),), invoke=i)]
    return Graph(mode="generate" if generation else "trace",
                 invokes=tuple(Invoke(prompts=(tuple(p),)) for p in prompts),
                 nodes=tuple(nodes), generation=generation)


def _unfinished(eng: AsyncEngine) -> int:
    """Requests the engine still runs (vLLM's own count: added and not finished/aborted)."""
    return eng.llm.output_processor.get_num_unfinished_requests()


def test_a_failing_invoke_stops_its_siblings_before_the_run_raises(engine):
    """Invoke 1's arguments fail when its request is built; invoke 0 (500 tokens) had
    started. Before: ``run`` raised at once and invoke 0 went on generating, unheld and
    uncharged (a server answered and freed the key's slot). Now it is aborted first."""
    loop, eng = engine
    graph = Graph(mode="generate", nodes=(),
                  invokes=(Invoke(prompts=((1, 2, 3),)),
                           Invoke(prompts=((4, 5, 6),), generation={"temperature": -1})),
                  generation={"max_new_tokens": 500, "ignore_eos": True})

    async def scenario() -> tuple[int, int]:
        with pytest.raises(Exception, match="temperature must be non-negative"):
            await eng.run(graph)
        right_after = _unfinished(eng)
        await asyncio.sleep(0.5)   # (an orphan would still be generating its 500 tokens)
        return right_after, _unfinished(eng)

    assert loop.run_until_complete(scenario()) == (0, 0)

    async def states() -> int:
        for _ in range(100):   # the worker's state is released in a task of its own
            if (await eng.stats())["states"] == 0:
                return 0
            await asyncio.sleep(0.05)
        return (await eng.stats())["states"]

    assert loop.run_until_complete(states()) == 0
    # the engine goes on serving: the same invoke alone runs to its length
    ok = loop.run_until_complete(eng.run(graph.model_copy(
        update={"invokes": graph.invokes[:1], "generation": {"max_new_tokens": 4}})))
    assert ok.generated[0].tolist()[:3] == [1, 2, 3] and len(ok.generated[0]) == 7


def test_a_runs_captures_are_held_to_one_cap_together(engine):
    """Four invokes each save 6 x 256 = 1536 bytes. Before: each request had the whole cap,
    so 4000 bytes let 6144 through; now the run's saves add up against it."""
    loop, eng = engine
    prompts = [[10 + k, 11, 12, 13, 14, 15] for k in range(4)]
    graph = _saving_graph(prompts)
    alone = loop.run_until_complete(eng.run(graph))
    each = [int(v.numel() * v.element_size()) for v in alone.saves.values()]
    assert each == [6 * HIDDEN_BYTES] * 4
    with pytest.raises(CaptureLimitError, match="cap of 4000 bytes.*together"):
        loop.run_until_complete(eng.run(graph, capture_cap=4000))
    fits = loop.run_until_complete(eng.run(graph, capture_cap=sum(each)))
    assert fits.saves.keys() == alone.saves.keys()
    assert all(torch.equal(fits.saves[k], alone.saves[k]) for k in alone.saves)


def _mixing_graph(prompt: list[int]) -> Graph:
    """A general graph (its value mixes positions: it needs the whole prompt in one forward):
    layer 0's output summed along the positions, saved."""
    return Graph(mode="trace", invokes=(Invoke(prompts=(tuple(prompt),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
        Node(id=1, op="method", args=(Ref(ref=0), 1), kwargs={"name": "cumsum"}),
        Node(id=2, op="save", args=(Ref(ref=1),))))


def test_a_general_graph_split_by_another_callers_prompt_is_rerun(engine):
    """A 244-token plain prompt (another user's) is prefilled 32 tokens a forward; the
    trace's 20-token prompt, alone in its phase, gets the 12 tokens its last chunk leaves:
    split. Before: the trace failed with "the prompt was split ... needs the whole prompt in
    one forward" (GraphRun.retries sent nothing again for a phase of one job: offline it ran
    alone, on the shared engine it did not). Now it is sent again and equals the run alone."""
    loop, eng = engine
    from vllm import SamplingParams

    prompt = list(range(300, 320))
    graph = _mixing_graph(prompt)
    alone = loop.run_until_complete(eng.run(graph))
    sent: list[tuple[int, int]] = []
    real = eng._run_job

    async def counting(run: Any, job: Any) -> None:
        sent.append(job.key)
        await real(run, job)

    async def beside_a_long_prompt() -> Any:
        async def plain() -> None:
            params = SamplingParams(max_tokens=4, ignore_eos=True)
            async for _ in eng.generate({"prompt_token_ids": list(range(1000, 1244))},
                                        params, "other-user"):
                pass

        other = asyncio.ensure_future(plain())
        await asyncio.sleep(0)   # (its request goes first)
        try:
            return await eng.run(graph)
        finally:
            await other

    eng._run_job = counting
    try:
        got = loop.run_until_complete(beside_a_long_prompt())
    finally:
        del eng._run_job
    assert len(sent) >= 2, "the trace's prompt was not split: nothing was tested"
    assert torch.equal(got.saves[2], alone.saves[2])
