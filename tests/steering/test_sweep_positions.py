"""The sweep's ``positions``: every form the steering kernels take works end to end (a slice
used to crash building the sweep file's settings with a TypeError), and a bad one is a
SweepError naming the accepted forms before any file is written."""

from __future__ import annotations

import json

import pytest
import torch

from vinterp import LanguageModel
from vinterp.evals.sweep import SweepError, sweep
from vinterp.steering import SteeringVector

MODEL = "tiny-llama"      # 2 layers, hidden size 64


@pytest.fixture(scope="module")
def model():
    return LanguageModel(MODEL)


@pytest.fixture(scope="module")
def vec():
    return SteeringVector({0: 5 * torch.randn(64, generator=torch.Generator().manual_seed(4))},
                          model=MODEL)


def _run(model, vec, out, positions):
    return sweep(model, vec, scales=[0.0, 6.0], prompts=["Hello there friend", "Hi"],
                 max_tokens=3, metrics="fluency", positions=positions, out_dir=out,
                 progress=False, plots=False)


def test_slice_positions_steer_the_same_rows_as_the_list(model, vec, tmp_path):
    by_slice = _run(model, vec, tmp_path / "s", slice(0, 2))
    by_list = _run(model, vec, tmp_path / "l", [0, 1])
    assert [r["fluency"] for r in by_slice] == [r["fluency"] for r in by_list]
    assert by_slice[0]["fluency"] != by_slice[1]["fluency"]      # the steering did something
    settings = json.loads((tmp_path / "s" / "sweep.json").read_text())["settings"]
    assert settings["positions"] == {"slice": [0, 2, None]}
    # the same slice resumes; another slice is another sweep
    assert _run(model, vec, tmp_path / "s", slice(0, 2)) == by_slice
    with pytest.raises(SweepError, match="positions differ"):
        _run(model, vec, tmp_path / "s", slice(0, 3))


@pytest.mark.parametrize("positions", ["last", 1.5, [], [0, "x"], slice(0, 2, 0),
                                       slice(0.5, 2), {"start": 0}, True])
def test_bad_positions_are_refused_up_front(model, vec, tmp_path, positions):
    with pytest.raises(SweepError, match=r"bad positions .*; use None, 'all', 'prompt', "
                                         r"'generated', an int, a list of ints or a slice"):
        _run(model, vec, tmp_path / "bad", positions)
    assert not (tmp_path / "bad").exists()
