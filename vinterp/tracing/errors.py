"""Errors users meet while tracing, each saying what went wrong and what to do instead."""

from __future__ import annotations


class TracingError(RuntimeError):
    """Misuse of a proxy or tracer inside (or after) a trace block."""


def data_dependent(what: str) -> TracingError:
    """The error for Python control flow that needs a value the trace has not computed yet."""
    return TracingError(
        f"{what} on a proxy inside a trace needs its value, which does not exist until the "
        "model runs. Keep the computation in the graph (e.g. torch.where(cond, a, b) "
        "instead of if, indexing instead of iteration), branch on what is known at trace "
        "time (x.shape is a real torch.Size for values of the prompt's forward, so "
        "`if x.shape[1] > 4:` works), or .save() the value and use it after the block."
    )


def not_saved(node_id: int) -> TracingError:
    """The error for touching a proxy after the trace that was never saved."""
    return TracingError(
        f"this value (graph node {node_id}) was not saved, so it does not exist after the "
        "trace. Call .save() on it inside the block (e.g. h = model.layers[0].output.save())."
    )
