"""Logits in a vLLM trace are computed only at the positions the graph can observe.

``read_positions`` proves from the IR which sequence positions of ``model.logits`` /
``model.lm_head.output`` / ``model.output.logits`` a graph reads; the worker computes those
rows only (the rest NaN, so a wrong proof could not pass for a value). Checked: the proof on
the graphs nnsight code makes, and the values against HF, batched with a request that reads
every position. (A graph that indexes positions gets its whole prompt in one forward: the
backend refuses longer prompts, so the rows are never split across chunks.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import VS_HF, on_engine, rel_err

from vinterp import LanguageModel
from vinterp_vllm.logit_rows import batched_logits, read_positions, wanted_rows

LONGER = "The quick brown fox jumps over the lazy dog and runs into the forest"
TARGET = 5


@pytest.fixture(scope="module")
def models(tiny_path, tiny_vllm):
    hf = LanguageModel(tiny_path)
    return hf, on_engine(hf, tiny_vllm)


def _positions(hf, body, key=("lm_head", "output"), value="logits"):
    with hf.trace("The capital of France is") as tr:
        body(hf)
    return read_positions(tr.graph, 0, key, value)


@pytest.mark.parametrize("body,key,value,want", [
    (lambda m: m.output.logits[:, -1].softmax(-1)[0, TARGET].save(),
     ("", "output"), "model_output", {-1}),
    (lambda m: (m.logits[0, -1].save(), m.lm_head.output[:, 3, :].save()),
     ("lm_head", "output"), "logits", {-1, 3}),
    (lambda m: m.logits.softmax(-1)[:, -1].save(), ("lm_head", "output"), "logits", None),
    (lambda m: m.logits.save(), ("lm_head", "output"), "logits", None),
    (lambda m: m.logits[:, 1:].save(), ("lm_head", "output"), "logits", None),
    (lambda m: m.output.save(), ("", "output"), "model_output", None),
])
def test_positions_proved_from_the_graph(models, body, key, value, want):
    got = _positions(models[0], body, key, value)
    assert (got if got is None else set(got)) == want


def _reads(m, prompt):
    with m.trace() as tr:
        with tr.invoke(prompt):
            p = m.output.logits[:, -1].softmax(-1)[0, TARGET].save()
            first = m.logits[0, 0].save()
            mid = m.lm_head.output[:, -3, :].save()
        with tr.invoke("Hi"):
            whole = m.logits.save()      # every position: no pruning for this request
    return [torch.as_tensor(v) for v in (p, first, mid, whole)]


@pytest.mark.parametrize("prompt", ["The capital of France is", LONGER])
def test_pruned_logits_equal_hf(models, prompt):
    hf, vl = models
    got, want = _reads(vl, prompt), _reads(hf, prompt)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert not torch.isnan(g).any()
        assert rel_err(g, w) <= VS_HF



def test_one_call_computes_only_the_wanted_rows_of_every_request():
    from vinterp_vllm.layout import RowSpan

    class Head:
        rows: list[int] = []

        def compute_logits(self, x):
            self.rows.append(x.shape[0])
            return x @ torch.ones(x.shape[-1], 7)

    head, normed = Head(), torch.randn(9, 4)
    w = torch.ones(4, 7)
    # a 5-token trace at rows 0..4 and another request's 4 rows at 5..8 (its last is sampled)
    trace = RowSpan(0, "a", 0, 5, first_pos=0, prompt_len=5)
    step = RowSpan(1, "b", 5, 9, first_pos=20, prompt_len=3)
    got = batched_logits(head, normed, [(trace, wanted_rows(trace, True, frozenset({-1, 1})),
                                         True),
                                        (step, wanted_rows(step, False, None), False)])
    assert head.rows == [3]
    assert torch.equal(got[0][[1, 4]], normed[[1, 4]] @ w)
    assert torch.isnan(got[0][[0, 2, 3]]).all()
    assert torch.equal(got[1], normed[8:9] @ w)
