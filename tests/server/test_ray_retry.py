"""The ingress's retry of a request whose engine replica died before any output was sent
(``ray_deployment._on_a_live_replica``); the whole path runs against real replicas in
``test_ray_serve.py``, this checks the window and what is not retried."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError  # noqa: E402

from vinterp_server import ray_deployment as rd  # noqa: E402
from vinterp_server.errors import EngineUnavailable  # noqa: E402


def _attempts(failures: list[BaseException | None]):
    """An attempt that raises each of ``failures`` in turn (``None``: answers), and its log."""
    log: list[float] = []

    async def attempt() -> str:
        log.append(time.monotonic())
        exc = failures[len(log) - 1] if len(log) <= len(failures) else None
        if exc is not None:
            raise exc
        return "answer"
    return attempt, log


def test_a_dead_engine_or_replica_is_retried_until_one_answers():
    attempt, log = _attempts([EngineUnavailable("engine died"), ActorDiedError(), None])
    assert asyncio.run(rd._on_a_live_replica(attempt)) == "answer"
    assert len(log) == 3
    assert log[1] - log[0] >= 0.09 and log[2] - log[1] >= 0.19   # (backing off)


def test_other_errors_are_not_retried():
    attempt, log = _attempts([ValueError("bad request")])
    with pytest.raises(ValueError, match="bad request"):
        asyncio.run(rd._on_a_live_replica(attempt))
    assert len(log) == 1


def test_past_the_window_it_is_a_503_that_says_so(monkeypatch):
    monkeypatch.setattr(rd, "RETRY_WINDOW_S", 0.5)
    attempt, log = _attempts([EngineUnavailable("engine died")] * 100)
    with pytest.raises(EngineUnavailable, match="no engine replica could take the request "
                                                "in 0 s") as err:
        asyncio.run(rd._on_a_live_replica(attempt))
    assert err.value.retry_after == 30
    # attempts at 0, 0.1 and 0.3 s (later on a loaded machine, never earlier); it stops
    # when the next wait would end past the window
    assert len(log) >= 2 and 0.09 <= log[-1] - log[0] <= 0.5 + 1.0


def test_the_window_counts_from_the_first_failure(monkeypatch):
    """An attempt that ran longer than the window before its engine died is still retried."""
    monkeypatch.setattr(rd, "RETRY_WINDOW_S", 0.3)
    calls = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.5)      # a long generation, then the engine dies
            raise EngineUnavailable("engine died")
        return "answer"
    assert asyncio.run(rd._on_a_live_replica(attempt)) == "answer"
