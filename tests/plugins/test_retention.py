"""A trace with more requests than the worker keeps undrained outcomes for still gets all of
them: the backend raises the worker's retention cap before it submits (a 1,300-invoke trace
used to lose its first 276 requests' outcomes to the default cap of 1,024)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def lm():
    from vinterp import LanguageModel

    return LanguageModel("tiny-llama", backend="vllm", max_model_len=128, max_num_seqs=8)


def test_more_invokes_than_the_retention_cap(lm):
    backend = lm._backend
    backend.llm.collective_rpc("vinterp_set_max_undrained", args=(4,))
    backend._undrained_cap = 4
    with lm.generate(max_new_tokens=2) as tr:
        saves = []
        for i in range(12):
            with tr.invoke(f"Prompt number {i} says"):
                lm.layers[1].output.steer(torch.ones(64) * 0.1 * i)
                saves.append(lm.layers[1].output[:, -1].save())
    assert len(tr.result) == 12
    assert all(s.shape == (1, 64) for s in saves)
    assert backend._undrained_cap >= 12
    stats = backend.llm.collective_rpc("vinterp_stats")[0]
    assert stats["evicted"] == 0 and stats["states"] == 0
