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


def _raw_ab(path, q, layer, vec, scale, rows=None):
    """Mean log-prob per answer token, matching minus other, steered by a forward hook
    (``rows(question_len, answer_len)``: the positions it steers; default all)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    where: list[int] = []

    def steer(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, where] += scale * vec
        return (h, *out[1:]) if isinstance(out, tuple) else h

    hook = model.model.layers[layer].register_forward_hook(steer)
    stem, yes, no = ab_answers(q)
    pre = tok(stem + "\n")["input_ids"]
    got = []
    with torch.no_grad():
        for ans in (yes, no):
            ids = tok(ans, add_special_tokens=False)["input_ids"]
            where[:] = range(len(pre) + len(ids)) if rows is None else rows(len(pre), len(ids))
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
    cell = [json.loads(x) for x in (tmp_path / "s" / "cells" / "L01_S+3.0.jsonl")
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
    zero = [json.loads(x) for x in (tmp_path / "s" / "cells" / "L01_S+0.0.jsonl")
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


@pytest.mark.parametrize("positions, rows", [
    (-1, lambda q, a: [q - 1]),                       # the question's last token
    ("generated", lambda q, a: list(range(q, q + a))),  # the answer's tokens
    ([0, -1], lambda q, a: [0, q - 1]),
])
def test_text_ab_positions_count_in_the_question(tmp_path, positions, rows):
    """Positions mean what they mean in generation: the question is the prompt and the answer
    its generated tokens. They once counted from the answer's end, so ``-1`` steered only the
    last answer token and the score equalled the unsteered one at every scale."""
    model = LanguageModel(MODEL, backend="hf")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(5))},
                         model=MODEL)
    qs = ab_questions()[:2]
    out = tmp_path / "s"
    sweep(model, vec, layers=[1], scales=[0.0, 6.0], metrics="ab", ab_questions=qs,
          positions=positions, out_dir=out, progress=False, plots=False)
    cell = [json.loads(x) for x in (out / "cells" / "L01_S+6.0.jsonl").read_text().splitlines()]
    zero = [json.loads(x) for x in (out / "cells" / "L01_S+0.0.jsonl").read_text().splitlines()]
    path = str(resolve_model(MODEL))
    for row, unsteered, q in zip(cell[:2], zero[:2], qs, strict=True):
        yes, no = _raw_ab(path, q, 1, vec[1], 6.0, rows)
        assert row["ab"] == pytest.approx(yes - no, abs=1e-4)
        assert row["ab"] != pytest.approx(unsteered["ab"], abs=1e-3)


def test_close_scales_keep_their_own_cells(tmp_path):
    """Cells are named by the exact scale: rounded to 3 decimals, 0.0002 and 0.0004 shared one
    file (the unsteered cell was lost), and resuming with 0.0001 computed nothing."""
    model = LanguageModel(MODEL, backend="hf")
    vec = SteeringVector({1: 400.0 * torch.randn(64, generator=torch.Generator().manual_seed(7))},
                         model=MODEL)
    kw = dict(layers=[1], metrics="ab", ab_questions=ab_questions()[:2], out_dir=tmp_path / "s",
              progress=False, plots=False)
    rows = sweep(model, vec, scales=[0.0, 0.0002, 0.0004], **kw)
    assert [r["scale"] for r in rows] == [0.0, 0.0002, 0.0004]
    assert len({r["ab"]["mean"] for r in rows}) == 3
    more = sweep(model, vec, scales=[0.0001], **kw)
    assert [r["scale"] for r in more] == [0.0001]
    assert more[0]["ab"]["mean"] not in {r["ab"]["mean"] for r in rows}


def test_cells_under_the_old_rounded_names_resume(tmp_path):
    """A sweep written with the 3-decimal names resumes without recomputing a cell whose file
    holds exactly the asked scale, and lists each cell once."""
    model = LanguageModel(MODEL, backend="hf")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(3))},
                         model=MODEL)
    kw = dict(layers=[1], metrics="ab", ab_questions=ab_questions()[:2], out_dir=tmp_path / "s",
              progress=False, plots=False)
    first = sweep(model, vec, scales=[0.0, 3.0], **kw)
    cells = tmp_path / "s" / "cells"
    (cells / "L01_S+3.0.jsonl").rename(cells / "L01_S+3.000.jsonl")
    stamp = (cells / "L01_S+3.000.jsonl").stat().st_mtime_ns
    again = sweep(model, vec, scales=[0.0, 3.0], **kw)
    assert again == first
    assert sorted(p.name for p in cells.iterdir()) == ["L01_S+0.0.jsonl", "L01_S+3.000.jsonl"]
    assert (cells / "L01_S+3.000.jsonl").stat().st_mtime_ns == stamp
