"""The ``roundtrip`` fixture (tests/conftest.py) itself: a save lost in the round trip fails."""

from __future__ import annotations

import types

import pytest


class _DropsASave:
    """The real backend, minus the last save in what it returns (a lossy round trip)."""

    def __init__(self, backend: object) -> None:
        self.inner = backend

    def run(self, graph: object) -> object:
        result = self.inner.run(graph)
        result.saves.pop(max(result.saves))
        return result


def test_roundtrip_fails_when_a_save_disappears(hf_model, roundtrip):
    model = hf_model("tiny-gpt2")
    with model.trace("The Eiffel Tower is in") as tracer:
        model.transformer.h[0].output.save()
        model.logits.save()
    roundtrip(model, tracer)
    lossy = types.SimpleNamespace(_backend=_DropsASave(model._backend))
    with pytest.raises(AssertionError, match="disappeared in the JSON round trip"):
        roundtrip(lossy, tracer)
