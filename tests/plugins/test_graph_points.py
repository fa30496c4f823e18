"""``graph_points="residual"``: only the residual stream calls the op from the compiled graph.

On CUDA every point the graph calls vinterp's op from splits vLLM's piecewise CUDA graphs, so
``engine_kwargs`` keeps only embeddings, layer outputs and the final norm in the graph there.
A step that needs another point (attention or MLP values, layer inputs) runs eagerly, every
hook firing (vLLM's ``skip_compiled``). Checked here on the CPU, where the same setting runs:

* the graph calls the op at the residual points only;
* residual steering and captures stay compiled (no eager step) and equal HF;
* attention/MLP writes and reads, alone or batched with residual ones, run in eager steps and
  equal HF;
* a point a step needed but never reached fails its request instead of silently not running;
* an unknown setting is refused with the choices.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import VS_HF, compiled_pass, rel_err, worker_stats

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time"]
NEW = 4
RESIDUAL = {"vinterp": {"graph_points": "residual"}}


@pytest.fixture(scope="session")
def models():
    """Session-scoped, like tests/compat's engine (each engine start costs seconds)."""
    hf = LanguageModel("tiny-llama")
    vl = LanguageModel("tiny-llama", backend="vllm", max_model_len=256, max_num_seqs=8,
                       kv_cache_memory_bytes=2**27, additional_config=RESIDUAL)
    return hf, vl


@pytest.fixture(scope="module")
def vec():
    return torch.randn(64, generator=torch.Generator().manual_seed(5))


def _run(m, vec, *, inner: bool, residual: bool):
    """Generate with a residual steer and capture and/or MLP/attention/layer-input work."""
    saves: list = []
    with m.generate(max_new_tokens=NEW, do_sample=False, ignore_eos=True) as tr:
        with tr.invoke(PROMPTS[0]):
            with tr.all():
                if residual:
                    m.model.layers[0].output.steer(vec, scale=3.0)
                    saves.append(m.model.layers[1].output[:, -1].save())
        with tr.invoke(PROMPTS[1]):
            with tr.all():
                if inner:
                    m.model.layers[0].mlp.output[:] *= 0.5
                    saves.append(m.model.layers[1].self_attn.output[0][:, -1].save())
                    saves.append(m.model.layers[1].input[:, -1].save())
    return [t.tolist() for t in tr.result], [torch.as_tensor(s) for s in saves]


def _check(models, vec, *, inner: bool, residual: bool) -> int:
    """Both backends agree; returns how many steps the vLLM engine ran eagerly."""
    hf, vl = models
    before = worker_stats(vl._backend.llm)["eager_steps"]
    toks_v, saves_v = _run(vl, vec, inner=inner, residual=residual)
    toks_h, saves_h = _run(hf, vec, inner=inner, residual=residual)
    assert toks_v == toks_h
    assert len(saves_v) == len(saves_h) > 0
    for a, b in zip(saves_v, saves_h, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) <= VS_HF
    return worker_stats(vl._backend.llm)["eager_steps"] - before


def test_graph_calls_the_op_at_residual_points_only(models):
    _, vl = models
    stats = worker_stats(vl._backend.llm)
    assert stats["points"] == 2 + 6 * 2
    if not compiled_pass():   # an eager engine has no graph: every point is served
        assert stats["graph_points"] == stats["points"]
        return
    assert stats["graph_points"] == 2 + 2   # embeddings, final norm, 2 layer outputs
    from vllm import SamplingParams

    calls = stats["point_calls"]
    vl._backend.llm.generate(["Hello there"], SamplingParams(max_tokens=3, temperature=0.0,
                                                             ignore_eos=True), use_tqdm=False)
    assert worker_stats(vl._backend.llm)["point_calls"] - calls == 3 * 4


def test_residual_work_stays_compiled(models, vec):
    assert _check(models, vec, inner=False, residual=True) == 0


def test_attention_and_mlp_work_runs_in_eager_steps(models, vec):
    eager = _check(models, vec, inner=True, residual=False)
    assert eager == (NEW if compiled_pass() else 0)


def test_mixed_batch_runs_eagerly_and_both_requests_are_right(models, vec):
    eager = _check(models, vec, inner=True, residual=True)
    assert eager == (NEW if compiled_pass() else 0)


def test_a_point_never_reached_fails_its_request(models, monkeypatch):
    """Without the eager fallback, a compiled step never reaches the MLP point: the request
    fails with a message instead of returning values its intervention never touched."""
    from vinterp_vllm import vllm_patches

    monkeypatch.setattr(vllm_patches, "_run_eagerly", lambda: None)
    _, vl = models

    def trace():
        with vl.trace(PROMPTS[0]):
            vl.model.layers[0].mlp.output[:] *= 0.5
            out = vl.model.layers[1].output.save()
        return out

    if not compiled_pass():   # an eager engine has no graph to miss the point
        assert trace().shape[1] > 1
        return
    with pytest.raises(Exception, match="never reached"):
        trace()


def test_unknown_graph_points_setting_is_refused():
    with pytest.raises(ValueError, match=r"graph_points.*'all', 'residual'"):
        m = LanguageModel("tiny-llama", backend="vllm",
                          additional_config={"vinterp": {"graph_points": "layers"}})
        with m.trace(PROMPTS[0]):
            m.model.layers[0].output.save()
