"""The exceptions a graph run raises: the user's error and the backends' control flow."""

from __future__ import annotations


class InterventionError(RuntimeError):
    """An intervention failed while running; the message names the node and the user's line."""


class CaptureLimitError(InterventionError):
    """A request's captures passed its cap (``capture_cap`` bytes): the request is too large
    as it stands (retrying it cannot help; save less)."""


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised from inside the forward once ``tracer.stop()`` is reached and nothing is pending."""


class NeedsPhases(Exception):  # noqa: N818 - control flow, not an error
    """A cross-invoke dependency could not be met in one forward; rerun by phases."""
