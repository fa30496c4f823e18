"""Small builders for hand-made graphs and raw-hook HF references."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from vinterp.ir import Graph, Invoke, ListV, Node, Ref, SliceV, Steps, TensorRef, encode_tensor


#: vLLM against the HF backend, both fp32: 1e-4 on the CPU. On a CUDA GPU vLLM's fp32 attention
#: (its Triton backend) multiplies in TF32, Triton's default for fp32 ``tl.dot``: up to 7.5e-4
#: against HF on the same H200 (benchmarks/results/gpu-h200-2026-11-27).
VS_HF = 2e-3 if torch.cuda.is_available() else 1e-4


def compiled_pass() -> bool:
    """Whether this run's vLLM engines are compiled (``make test`` runs tests/plugins again with
    ``VINTERP_VLLM_EAGER=1``)."""
    from vinterp.backends.vllm.engine import EAGER_ENV

    return os.environ.get(EAGER_ENV, "") in ("", "0")


def worker_stats(llm: Any) -> dict[str, Any]:
    """The plugin's counters (``vinterp_stats``) from a ``vllm.LLM``'s worker."""
    return llm.collective_rpc("vinterp_stats")[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-based relative error (on the CPU: a GPU engine's value against a CPU reference)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def on_engine(hf: Any, backend: Any) -> Any:
    """A vllm-backend copy of the HF ``LanguageModel`` ``hf`` that runs on ``backend``, an
    existing ``VllmBackend`` (tests share engines: each start costs seconds to minutes)."""
    import copy

    m = copy.copy(hf)
    m.backend_name, m._backend, m._tracers, m._meta_backend = "vllm", backend, [], None
    m._model = m._meta_model()
    return m


def generate_with_edits(m: Any, prompts: list[str], new: int,
                        edits: list[Callable[[Any], None]],
                        reads: Callable[[Any], tuple]) -> tuple[list, list[torch.Tensor]]:
    """Greedy generation of ``new`` tokens, one invoke per prompt: invoke ``i`` applies
    ``edits[i % len(edits)]`` to the first layer's output at every step, and saves each value
    of ``reads(m)`` at every step. Returns the token lists and the saves (flattened, on the
    CPU), in order."""
    layers = m.layers
    saves: list = []
    with m.generate(max_new_tokens=new, do_sample=False, ignore_eos=True) as tr:
        for i, p in enumerate(prompts):
            with tr.invoke(p):
                with tr.all():
                    edits[i % len(edits)](layers[0].output)
                    saves.extend(v.save() for v in reads(m))
    return ([t.tolist() for t in tr.result],
            [torch.as_tensor(s).float().cpu().reshape(-1) for s in saves])


def ir_value(v: Any) -> Any:
    """A Python position spec as an IR value (lists and slices have their own IR types)."""
    if isinstance(v, list):
        return ListV(list=tuple(v))
    if isinstance(v, slice):
        return SliceV(slice=(v.start, v.stop, v.step))
    return v


def capture_graph(prompts: list[list[int]], points: list[str], mode: str = "trace",
                  generation: dict[str, Any] | None = None) -> tuple[Graph, list[int]]:
    """One invoke per prompt, each saving the output of every module in ``points``."""
    nodes, saves, nid = [], [], 0
    for i in range(len(prompts)):
        for p in points:
            nodes.append(Node(id=nid, op="read", kwargs={"module": p, "kind": "output"},
                              invoke=i))
            nodes.append(Node(id=nid + 1, op="save", args=(Ref(ref=nid),), invoke=i))
            saves.append(nid + 1)
            nid += 2
    g = Graph(mode=mode, invokes=tuple(Invoke(prompts=(tuple(p),)) for p in prompts),
              nodes=tuple(nodes), generation=generation or {})
    return g, saves


def steer_graph(prompts: list[list[int]], specs: list[dict[str, Any] | None],
                max_new_tokens: int = 8) -> Graph:
    """One invoke per prompt; spec = {layer, vector, scale, positions, op} or None (plain)."""
    nodes, tensors, nid = [], [], 0
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        op = spec.get("op", "steer")
        kw: dict[str, Any] = {}
        if op in ("steer", "replace"):
            kw["vector"] = TensorRef(tensor=len(tensors))
            tensors.append(encode_tensor(spec["vector"]))
        if op in ("ablate", "clamp"):
            kw["direction"] = TensorRef(tensor=len(tensors))
            tensors.append(encode_tensor(spec["vector"]))
        if op == "steer":
            kw["scale"] = spec.get("scale", 1.0)
        if op == "scale":
            kw["factor"] = spec.get("factor", 1.0)
        if op == "clamp":
            kw["min"], kw["max"] = spec.get("min"), spec.get("max")
        if spec.get("positions") is not None:
            kw["positions"] = ir_value(spec["positions"])
        module = f"model.layers.{spec['layer']}"
        steps = Steps(start=0, stop=None)
        nodes.append(Node(id=nid, op="read", kwargs={"module": module, "kind": "output"},
                          invoke=i, steps=steps))
        nodes.append(Node(id=nid + 1, op=op, args=(Ref(ref=nid),), kwargs=kw, invoke=i,
                          steps=steps))
        nid += 2
    return Graph(mode="generate", invokes=tuple(Invoke(prompts=(tuple(p),)) for p in prompts),
                 nodes=tuple(nodes), tensors=tuple(tensors),
                 generation={"max_new_tokens": max_new_tokens, "do_sample": False})


def hf_capture(model: torch.nn.Module, ids: list[int], points: list[str]) -> dict[str, Any]:
    """Raw forward hooks on the HF model: each point's output for one prompt."""
    got: dict[str, Any] = {}
    handles = []
    mods = dict(model.named_modules())
    for p in points:
        def hook(m, a, out, p=p):
            got[p] = out[0] if isinstance(out, tuple) else out
        handles.append(mods[p].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    got["lm_head"] = out.logits
    return got
