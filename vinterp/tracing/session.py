"""Remote sessions: several traces sent to a vinterp server as one request.

Separate from the tracer: a session only queues finished traces and hands each its result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vinterp.tracing.running import apply_result

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer


class RemoteSession:
    """``model.session(remote=True)``: the traces recorded inside, sent as one request.

    Each trace's graph is built when its block ends; a saved value of an earlier trace used
    in a later one becomes an :class:`ir.SessionValue` that the server fills in from that
    trace's result. When the session block ends, every graph goes in one ``POST /v1/traces``
    (``session: [graph, ...]``) and each trace gets its own saves back.

    Example::

        with model.session(remote=True):                 # doctest: +SKIP
            with model.trace("The Eiffel Tower is in"):
                clean = model.layers[8].output.save()
            with model.trace("The Colosseum is in"):
                model.layers[8].output[:] = clean
                logits = model.logits.save()
        print(logits.shape)                               # one request for both traces
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.tracers: list[Tracer] = []

    def add(self, tracer: Tracer) -> None:
        """Queue a finished trace (its graph is built)."""
        self.tracers.append(tracer)

    def holds(self, tracer: Tracer) -> bool:
        """Whether ``tracer`` is a queued trace of this session."""
        return any(t is tracer for t in self.tracers)

    def index(self, tracer: Tracer) -> int:
        """``tracer``'s position in the session (the ``trace`` of its session values)."""
        return next(i for i, t in enumerate(self.tracers) if t is tracer)

    def run(self) -> None:
        """Send every queued trace as one request and give each its results."""
        if not self.tracers:
            return
        graphs = [t._graph for t in self.tracers]
        results = self.backend.run_session(graphs)
        for tracer, result in zip(self.tracers, results, strict=True):
            apply_result(tracer, result)
