"""The plugin inside vLLM's compiled mode: really compiled, same results as eager, every path.

vLLM compiles the model with torch.compile (``DYNAMO_TRACE_ONCE`` + inductor on CPU). The
plugin's hooks go in before that (``vllm_patches``) and each calls the ``vinterp::point`` op,
whose Python runs every step. Checked here against the same settings with
``enforce_eager=True`` and against the HF backend:

* the compiled engine is compiled (vLLM's compilation mode) and the op runs *from the compiled
  graph*: a plain request, which no hook would touch eagerly, still calls the op at every
  point of every step;
* each fast-path op (steer, scale, ablate, clamp, replace, with positions), last-token and
  whole-value captures, per-step captures in generation and a general graph (a write the
  vectorized path does not recognise) give, compiled, the eager engine's values within 1e-5
  relative and identical greedy tokens, and HF's values (the writes happened) within 1e-4.

Compiled and eager are not bit-identical: inductor fuses and orders fp32 ops its own way.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import VS_HF, compiled_pass, generate_with_edits, on_engine, rel_err, worker_stats

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402

PROMPTS = ["The capital of France is", "The quick brown fox jumps over the lazy dog. " * 6, "Hi"]
NEW = 5


def _backend(tiny_path, eager: bool):
    from vinterp.backends.vllm import VllmBackend

    return VllmBackend(tiny_path, max_num_batched_tokens=32, enable_prefix_caching=True,
                       max_num_seqs=32, max_model_len=256, enforce_eager=eager)


@pytest.fixture(scope="session")
def engines(tiny_path, tiny_vllm):
    """conftest's engine (compiled, or eager in the suite's eager pass) and its counterpart
    (session-scoped, see conftest)."""
    other = _backend(tiny_path, eager=compiled_pass())
    if not compiled_pass():
        return {"compiled": other, "eager": tiny_vllm}
    return {"compiled": tiny_vllm, "eager": other}


@pytest.fixture(scope="module")
def models(tiny_path, engines):
    hf = LanguageModel(tiny_path)
    out = {"hf": hf}
    for name, backend in engines.items():
        out[name] = on_engine(hf, backend)
    return out


def test_compiled_engine_runs_the_op_from_its_graph(engines):
    from vllm import SamplingParams

    plain = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    calls = {}
    for name, backend in engines.items():
        before = worker_stats(backend.llm)
        backend.llm.generate(["Hello there"], plain, use_tqdm=False)
        after = worker_stats(backend.llm)
        calls[name] = after["point_calls"] - before["point_calls"]
        assert after["points"] == 2 + 6 * 2   # embed, final norm; 6 per layer, 2 layers
    assert worker_stats(engines["compiled"].llm)["compilation"] != "NONE"
    assert worker_stats(engines["eager"].llm)["compilation"] == "NONE"
    # compiled: the graph calls the op at each of its points (all 14 on CPU; the residual
    # stream's 4 on CUDA, see test_graph_points.py) though no request intervenes; 3 forwards
    in_graph = worker_stats(engines["compiled"].llm)["graph_points"]
    assert in_graph == (4 if torch.cuda.is_available() else 14)
    assert calls["compiled"] >= 3 * in_graph
    # eager: hooks skip the op where nothing intervenes
    assert calls["eager"] == 0


@pytest.fixture(scope="module")
def vecs():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(64, generator=g)
    return {"v": torch.randn(64, generator=g), "d": d / d.norm(), "w": torch.randn(64, generator=g)}


def _generate(m, vecs):
    """One generate trace: a different intervention per invoke, per-step captures."""
    def idiom(x):
        x[:] += vecs["v"]            # nnsight's idiom (fast path)

    def general(x):
        x[:] = torch.tanh(x) * 3.0   # not recognised: the general path

    edits = [lambda x: x.steer(vecs["v"], scale=2.0),
             lambda x: x.scale(1.5, positions=[0, 1]),
             lambda x: x.ablate(vecs["d"]),
             lambda x: x.clamp(vecs["d"], min=-0.1, max=0.1),
             lambda x: x.replace(vecs["w"], positions=-1),
             idiom, general]
    # the body of ``tracer.all()`` runs per step: one save of each read per step
    return generate_with_edits(m, PROMPTS * 3, NEW, edits,
                               lambda m: (m.model.layers[1].output[:, -1], m.model.norm.output))


def test_steering_and_captures_compiled_equal_eager_and_hf(models, vecs):
    got = {name: _generate(m, vecs) for name, m in models.items()}
    toks_c, saves_c = got["compiled"]
    toks_e, saves_e = got["eager"]
    toks_h, saves_h = got["hf"]
    assert toks_c == toks_e == toks_h
    assert len(saves_c) == len(saves_e) == len(saves_h) == 2 * 3 * len(PROMPTS) * NEW
    for c, e, h in zip(saves_c, saves_e, saves_h, strict=True):
        assert c.shape == e.shape == h.shape
        assert rel_err(c, e) <= 1e-5
        assert rel_err(c, h) <= VS_HF


def test_general_graph_fires_when_compiled(models):
    """A trace-mode general graph (read, compute, write a slice) changes what follows, as on
    HF: it ran inside the compiled forward, not silently skipped."""
    def run(m, write: bool):
        with m.trace(PROMPTS[0]):
            h = m.model.layers[0].mlp.output
            if write:
                h[:, 2:4] = h[:, 2:4] * -2.0 + 0.25
            out = m.model.layers[1].output.save()
        return torch.as_tensor(out)

    plain, written = run(models["compiled"], False), run(models["compiled"], True)
    assert rel_err(written, plain) > 1e-2
    assert rel_err(written, run(models["hf"], True)) <= VS_HF
    assert rel_err(written, run(models["eager"], True)) <= 1e-5


@pytest.fixture(scope="session")
def plain_engine(tiny_path):
    """A plain engine with the worker extension but no ``additional_config`` (session-scoped
    like the others, see conftest)."""
    from vllm import LLM

    return LLM(model=str(tiny_path), dtype="float32", enforce_eager=True, seed=0,
               worker_extension_cls="vinterp_vllm.worker.VinterpWorkerExtension",
               kv_cache_memory_bytes=2**27, max_model_len=128)


def test_engine_without_vinterp_config_is_refused_clearly(plain_engine):
    """Such an engine has no hooks: the install check says how to build it, instead of
    running interventions that never fire."""
    with pytest.raises(Exception, match="built without vinterp's hooks"):
        plain_engine.collective_rpc("vinterp_install", args=("llama",))


def test_cuda_compilation_config_splits_at_the_op():
    """On CUDA the op must run between piecewise graphs: vinterp's op joins vLLM's attention
    splitting ops, FULL graph modes (which would replay the op's first capture) are refused."""
    from vinterp_vllm.graph_op import OP_NAME, cuda_compilation_config
    from vllm.config.compilation import CompilationConfig

    cfg = cuda_compilation_config(None)
    assert cfg["cudagraph_mode"] == "PIECEWISE"
    assert OP_NAME in cfg["splitting_ops"]
    assert set(CompilationConfig._attention_ops) <= set(cfg["splitting_ops"])
    assert cuda_compilation_config('{"splitting_ops": ["x::y"]}')["splitting_ops"] == [
        "x::y", OP_NAME]
    for mode in ("FULL", "FULL_AND_PIECEWISE", "full_decode_only"):
        with pytest.raises(ValueError, match="would replay vinterp's per-step"):
            cuda_compilation_config({"cudagraph_mode": mode})
    with pytest.raises(ValueError, match="as a dict"):
        cuda_compilation_config(CompilationConfig())
