"""vLLM plugin vs raw HF hooks on tiny-llama, with chunked prefill (32 tokens) + prefix caching."""

from __future__ import annotations

import torch
from helpers import capture_graph, hf_capture, rel_err, steer_graph

from vinterp.steering.kernels import apply_steering

POINTS = ["model.embed_tokens", "model.layers.0", "model.layers.1.self_attn",
          "model.layers.1.mlp", "model.layers.1", "model.norm"]


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def test_captures_equal_hf_across_chunks(tiny_vllm, tiny_hf):
    prompts = _prompts([7, 40, 13, 70])  # 40 and 70 tokens span several 32-token chunks
    graph, saves = capture_graph(prompts, POINTS)
    tiny_vllm.check(graph)
    res = tiny_vllm.run(graph)
    for i, ids in enumerate(prompts):
        ref = hf_capture(tiny_hf, ids, POINTS)
        for k, point in enumerate(POINTS):
            got = res.saves[saves[i * len(POINTS) + k]]
            if point.endswith("self_attn"):
                assert isinstance(got, tuple) and got[1] is None  # HF's (out, weights)
                got = got[0]
            assert got.shape == ref[point].shape
            assert rel_err(got, ref[point]) < 1e-4, (i, point)


def _hf_steered_greedy(model, ids, spec, n_new):
    """Greedy decoding without a KV cache; a raw hook steers by absolute position."""
    layer = dict(model.named_modules())[f"model.layers.{spec['layer']}"]
    plen = len(ids)

    def hook(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        kw = {k: spec[k] for k in ("scale", "factor", "min", "max", "positions") if k in spec}
        key = "direction" if spec.get("op") in ("ablate", "clamp") else "vector"
        apply_steering(spec.get("op", "steer"), x, torch.arange(x.shape[1]), plen,
                       **{key: spec.get("vector")}, **kw)

    h = layer.register_forward_hook(hook)
    seq = list(ids)
    try:
        with torch.no_grad():
            for _ in range(n_new):
                logits = model(torch.tensor([seq])).logits
                seq.append(int(logits[0, -1].argmax()))
    finally:
        h.remove()
    return seq


def test_steered_greedy_equals_hf(tiny_vllm, tiny_hf):
    prompts = _prompts([5, 36, 12])
    g = torch.Generator().manual_seed(1)

    all_specs = [
        {"layer": 0, "scale": 4.0},
        {"layer": 1, "scale": -3.0, "positions": "generated"},
        {"layer": 0, "op": "ablate", "positions": [0, -1]},
        {"layer": 1, "op": "replace", "positions": slice(1, 4)},
        {"layer": 1, "factor": 3.0, "op": "scale", "positions": "prompt"},
        {"layer": 0, "op": "clamp", "min": -0.5, "max": 0.5},
    ]
    jobs = [(p, dict(s, vector=torch.randn(64, generator=g) * 3))
            for p in prompts for s in all_specs]
    graph = steer_graph([p for p, _ in jobs], [s for _, s in jobs], max_new_tokens=8)
    res = tiny_vllm.run(graph)
    for k, (ids, spec) in enumerate(jobs):
        want = _hf_steered_greedy(tiny_hf, ids, spec, 8)
        assert res.generated[k].tolist() == want, (k, spec["op"] if "op" in spec else "steer")


def test_general_graph_whole_prompt_despite_chunking(tiny_vllm, tiny_hf):
    """Last-token saves index positions: prompts split by the 32-token budget are rerun alone."""
    from vinterp.ir import Graph, Invoke, Node, Ref, SliceV, TupleV

    prompts = _prompts([20, 20, 20, 9], seed=3)  # 69 tokens: some prompt gets split
    key = TupleV(tuple=(SliceV(slice=(None, None, None)), -1, SliceV(slice=(None, None, None))))
    nodes = []
    for i in range(len(prompts)):
        nodes += [Node(id=3 * i, op="read", kwargs={"module": "model.layers.1", "kind": "output"},
                       invoke=i),
                  Node(id=3 * i + 1, op="getitem", args=(Ref(ref=3 * i), key), invoke=i),
                  Node(id=3 * i + 2, op="save", args=(Ref(ref=3 * i + 1),), invoke=i)]
    graph = Graph(invokes=tuple(Invoke(prompts=(tuple(p),)) for p in prompts), nodes=tuple(nodes))
    res = tiny_vllm.run(graph)
    for i, ids in enumerate(prompts):
        ref = hf_capture(tiny_hf, ids, ["model.layers.1"])["model.layers.1"][:, -1, :]
        assert rel_err(res.saves[3 * i + 2], ref) < 1e-4
