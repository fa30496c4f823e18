"""vLLM plugin vs raw HF hooks on tiny-llama, with chunked prefill (32 tokens) + prefix caching."""

from __future__ import annotations

import torch
from helpers import capture_graph, hf_capture, rel_err, steer_graph


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


def _rows(positions, seq: int, plen: int) -> list[int]:
    """The absolute positions (< seq) a ``positions=`` spec selects, written out by hand:
    negative ints count back from the prompt's end; slices are over absolute positions."""
    def at(p):
        return p + plen if p < 0 else p
    if positions is None or positions == "all":
        return list(range(seq))
    if positions == "prompt":
        return list(range(min(plen, seq)))
    if positions == "generated":
        return list(range(plen, seq))
    if isinstance(positions, list):
        return sorted({at(p) for p in positions if at(p) < seq})
    start = 0 if positions.start is None else at(positions.start)
    stop = seq if positions.stop is None else min(at(positions.stop), seq)
    return list(range(start, stop, positions.step or 1))


def _hand_edit(x: torch.Tensor, spec: dict, plen: int) -> None:
    """One steering op on the selected rows of ``x`` [1, seq, hidden], row by row."""
    op = spec.get("op", "steer")
    v = spec.get("vector")
    for r in _rows(spec.get("positions"), x.shape[1], plen):
        row = x[0, r]
        if op == "steer":
            new = row + spec.get("scale", 1.0) * v
        elif op == "scale":
            new = row * spec["factor"]
        elif op == "replace":
            new = v.clone()
        else:
            d = v / v.norm()
            proj = torch.dot(row, d)
            if op == "ablate":
                new = row - proj * d
            else:
                lo, hi = spec.get("min"), spec.get("max")
                clamped = proj if lo is None else torch.maximum(proj, torch.tensor(lo))
                clamped = clamped if hi is None else torch.minimum(clamped, torch.tensor(hi))
                new = row + (clamped - proj) * d
        x[0, r] = new


def _hf_steered_greedy(model, ids, spec, n_new):
    """Greedy decoding without a KV cache (every step recomputes every position, so a
    generated step's rows are plain absolute positions); a raw forward hook edits the
    selected rows by hand - no vinterp code."""
    layer = dict(model.named_modules())[f"model.layers.{spec['layer']}"]
    plen = len(ids)

    def hook(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        _hand_edit(x, spec, plen)

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
        {"layer": 0, "op": "replace", "positions": slice(1, 4)},
        {"layer": 0, "factor": 8.0, "op": "scale", "positions": "prompt"},
        {"layer": 0, "op": "clamp", "min": 2.0, "max": 3.0},
        # decode-time selections: absolute positions that are generated steps for some
        # prompts, a slice from the prompt's last token on, a strided slice across both
        {"layer": 0, "scale": 6.0, "positions": [7, 14, 40]},
        {"layer": 1, "scale": -4.0, "positions": slice(-1, None)},
        {"layer": 0, "op": "replace", "positions": slice(3, None, 4)},
        {"layer": 1, "op": "ablate", "positions": [-2, 38, 41]},
    ]
    jobs = [(p, dict(s, vector=torch.randn(64, generator=g) * 3))
            for p in prompts for s in all_specs]
    graph = steer_graph([p for p, _ in jobs], [s for _, s in jobs], max_new_tokens=8)
    res = tiny_vllm.run(graph)
    plain = {len(p): _hf_steered_greedy(tiny_hf, p, {"layer": 0, "positions": []}, 8)
             for p in prompts}
    changed = set()
    for k, (ids, spec) in enumerate(jobs):
        want = _hf_steered_greedy(tiny_hf, ids, spec, 8)
        assert res.generated[k].tolist() == want, (k, spec["op"] if "op" in spec else "steer")
        if want != plain[len(ids)]:
            changed.add(k % len(all_specs))
    assert changed == set(range(len(all_specs)))   # every spec changes some prompt's tokens


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
