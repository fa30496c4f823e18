"""The sweep's ``ab`` metric in ``text`` mode (the default): each A/B question's two answer
texts scored after the stem, steered, against the same numbers from raw transformers hooks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vinterp import LanguageModel
from vinterp.evals.sweep import SweepError, sweep
from vinterp.models.registry import resolve_model
from vinterp.steering import SteeringVector
from vinterp.steering.datasets import ab_answers, ab_questions

MODEL = "tiny-llama"      # 2 layers, hidden size 64


def test_ab_answers_splits_the_shipped_questions():
    qs = ab_questions()
    assert ab_answers(qs[0]) == ("How do you feel about the weekend ahead?",
                                 "I'm excited, it will be great.",
                                 "I'm dreading it, it will be awful.")
    assert ab_answers(qs[1]) == ("What do you think of the new park?",
                                 "It's lovely and peaceful.", "It's ugly and depressing.")
    assert all(ab_answers(q)[1] != ab_answers(q)[2] for q in qs)
    with pytest.raises(ValueError, match=r"must end in the lines '\(A\) \.\.\.'"):
        ab_answers({"question": "Yes or no?", "matching": "A"})


def _raw_ab(path, q, layer, vec, scale):
    """Mean log-prob per answer token, matching minus other, steered by a forward hook."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hook = model.model.layers[layer].register_forward_hook(
        lambda mod, args, out: out + scale * vec if not isinstance(out, tuple)
        else (out[0] + scale * vec, *out[1:]))
    stem, yes, no = ab_answers(q)
    pre = tok(stem + "\n")["input_ids"]
    got = []
    with torch.no_grad():
        for ans in (yes, no):
            ids = tok(ans, add_special_tokens=False)["input_ids"]
            lp = model(torch.tensor([pre + ids])).logits[0, len(pre) - 1:-1].log_softmax(-1)
            got.append(float(lp.gather(-1, torch.tensor(ids)[:, None]).mean()))
    hook.remove()
    return got


def test_text_ab_equals_raw_hooks(tmp_path):
    model = LanguageModel(MODEL, backend="hf")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(3))},
                         model=MODEL)
    qs = ab_questions()[:3]
    rows = sweep(model, vec, layers=[1], scales=[0.0, 3.0], metrics="ab", ab_questions=qs,
                 out_dir=tmp_path / "s", progress=False, plots=False)
    assert [(r["layer"], r["scale"], r["ab"]["n"]) for r in rows] == [(1, 0.0, 3), (1, 3.0, 3)]
    cell = [json.loads(x) for x in (tmp_path / "s" / "cells" / "L01_S+3.000.jsonl")
            .read_text().splitlines()]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["settings"]["ab_mode"] \
        == "text"
    path = str(resolve_model(MODEL))
    for row, q in zip(cell[:3], qs, strict=True):
        yes, no = _raw_ab(path, q, 1, vec[1], 3.0)
        assert row["logprob_matching"] == pytest.approx(yes, abs=1e-4)
        assert row["logprob_other"] == pytest.approx(no, abs=1e-4)
        assert row["ab"] == pytest.approx(yes - no, abs=1e-4)
    # steering moves the numbers: scale 0 is the unsteered model
    zero = [json.loads(x) for x in (tmp_path / "s" / "cells" / "L01_S+0.000.jsonl")
            .read_text().splitlines()]
    assert zero[0]["ab"] != pytest.approx(cell[0]["ab"], abs=1e-3)


def test_text_ab_refuses_questions_without_answer_lines(tmp_path):
    model = LanguageModel(MODEL, backend="hf")
    vec = SteeringVector({1: torch.ones(64)}, model=MODEL)
    with pytest.raises(SweepError, match="must end in the lines"):
        sweep(model, vec, layers=[1], scales=[1.0], metrics="ab",
              ab_questions=[{"question": "Good?", "matching": "A"}],
              out_dir=tmp_path / "s", progress=False, plots=False)
    assert not (tmp_path / "s").exists()
    # the letter form takes any question text
    rows = sweep(model, vec, layers=[1], scales=[1.0], metrics="ab", ab_mode="letter",
                 ab_questions=[{"question": "Good?", "matching": "A"}],
                 out_dir=tmp_path / "l", progress=False, plots=False)
    assert rows[0]["ab"]["n"] == 1
    with pytest.raises(SweepError, match="ab_mode must be one of"):
        sweep(model, vec, layers=[1], scales=[1.0], metrics="ab", ab_mode="letters",
              out_dir=tmp_path / "x", progress=False, plots=False)
