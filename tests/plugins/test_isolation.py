"""Many requests in one batch: each equals itself run alone; plain rows equal plain vLLM."""

from __future__ import annotations

import torch
from helpers import rel_err, steer_graph
from vllm import SamplingParams

from vinterp.ir import Graph, Node, Ref, Steps


def _with_capture(graph: Graph, invoke: int, layer: int) -> tuple[Graph, int]:
    """Add a save of ``layer``'s output (every step) to ``invoke``."""
    nid = max(n.id for n in graph.nodes) + 1 if graph.nodes else 0
    steps = Steps(start=0, stop=None)
    extra = (Node(id=nid, op="read", kwargs={"module": f"model.layers.{layer}", "kind": "output"},
                  invoke=invoke, steps=steps),
             Node(id=nid + 1, op="save", args=(Ref(ref=nid),), invoke=invoke, steps=steps))
    return graph.model_copy(update={"nodes": graph.nodes + extra}), nid + 1


def test_batch_equals_alone_and_plain_rows_untouched(tiny_vllm):
    g = torch.Generator().manual_seed(7)
    n = 64
    prompts = [torch.randint(3, 500, (int(torch.randint(3, 45, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    # same prompt, different intervention in one batch (these prompts are shorter than one KV
    # block, so nothing is cached here: test_prefix_cache.py checks the prefix cache)
    prompts[5] = prompts[4][:]
    words = [None, "prompt", "generated", [-1], slice(0, 3)]
    specs = []
    for i in range(n):
        if i % 4 == 3:
            specs.append(None)  # plain request in the same batch
            continue
        specs.append({"layer": int(torch.randint(0, 2, (1,), generator=g)),
                      "vector": torch.randn(64, generator=g) * 3,
                      "scale": float(torch.rand(1, generator=g) * 4),
                      "positions": words[i % len(words)]})
    graph = steer_graph(prompts, specs, max_new_tokens=6)
    graph, save_id = _with_capture(graph, 0, 1)
    together = tiny_vllm.run(graph)

    for i in range(n):
        if specs[i] is None:
            continue
        alone_graph = steer_graph([prompts[i]], [specs[i]], max_new_tokens=6)
        if i == 0:
            alone_graph, alone_save = _with_capture(alone_graph, 0, 1)
        alone = tiny_vllm.run(alone_graph)
        assert together.generated[i].tolist() == alone.generated[0].tolist(), i
        if i == 0:
            a, b = together.saves[save_id], alone.saves[alone_save]
            assert len(a) == len(b) == 6  # one capture per step
            for x, y in zip(a, b, strict=True):
                assert rel_err(x, y) < 1e-4

    plain = tiny_vllm.llm.generate(
        [{"prompt_token_ids": prompts[i]} for i in range(n) if specs[i] is None],
        SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    plain_ids = [p.prompt_token_ids + list(p.outputs[0].token_ids) for p in plain]
    got = [together.generated[i].tolist() for i in range(n) if specs[i] is None]
    assert got == plain_ids
