"""Generation step loops: ``for step in tracer.iter[...]``, ``tracer.all()`` and their
``with`` forms.

Which steps the interventions recorded inside apply to, kept apart from the tracer because it
is its own topic: unrolling a Python loop (or re-running a ``with`` body, see
:mod:`vinterp.tracing.stepbody`) step by step over the tracer's recording state.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vinterp.ir.schema import Steps
from vinterp.tracing import stepbody
from vinterp.tracing.errors import TracingError
from vinterp.tracing.kept import _KEEP_DEPTH
from vinterp.tracing.proxy import Proxy

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer


class _StepIter:
    """``tracer.iter[...]``: which generation steps a block of interventions targets.

    ``for step in tracer.iter[a:b]:`` is a real Python loop, unrolled while tracing: the
    body runs once per step with ``step`` a plain int, and what it records applies at that
    step only (so ``if step == 2:`` works and appends give one item per step). The
    generation budget (``max_new_tokens``) bounds open slices. ``with tracer.iter[a:b]:``
    (nnsight's deprecated form) also runs its body once per step, without a step index (see
    :meth:`_StepScope.__enter__`).
    """

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def __getitem__(self, key: slice | int | list[int] | tuple[int, ...]) -> _StepScope:
        if isinstance(key, bool):
            raise TracingError("tracer.iter takes a step index, a slice or a list of steps")
        if isinstance(key, int):
            if key < 0:
                raise TracingError(f"tracer.iter[{key}]: steps count from 0 (the prompt); "
                                   "there is no negative step")
            return _StepScope(self._tracer, key, key + 1)
        if isinstance(key, (list, tuple)):
            if not key or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                  for k in key):
                raise TracingError(f"tracer.iter[{list(key)!r}]: a list of steps must hold "
                                   "non-negative ints")
            # in step order, as nnsight runs them (the model reaches step 0 before step 2)
            steps = sorted(set(key))
            return _StepScope(self._tracer, steps[0], steps[-1] + 1, indices=steps)
        if not isinstance(key, slice) or (key.step not in (None, 1)):
            raise TracingError("tracer.iter takes a step index, a slice like [a:b] or a list "
                               "of steps like [[0, 2]]")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                   for v in (key.start, key.stop)):
            raise TracingError(f"tracer.iter[{key.start}:{key.stop}]: the bounds must be "
                               "ints (steps are known while tracing, not values of the model)")
        # an open start is the current step: 0, or where `tracer.next()` moved this invoke
        start = self._tracer._steps.start if key.start is None else key.start
        if start < 0 or (key.stop is not None and key.stop <= start):
            raise TracingError(f"tracer.iter[{key.start}:{key.stop}] selects no steps")
        return _StepScope(self._tracer, start, key.stop)


class _StepScope:
    """The steps ``start <= step < stop`` (``stop=None``: to the end), or ``indices``."""

    def __init__(self, tracer: Tracer, start: int, stop: int | None,
                 indices: list[int] | None = None) -> None:
        self._tracer = tracer
        self._start, self._stop, self._indices = start, stop, indices
        #: per open ``with``: the outer steps, the re-run plan (None: recorded once), the
        #: first node recorded in it and whether its source was missing
        self._saved: list[tuple[Steps, Any, int, bool]] = []

    def __enter__(self) -> _StepScope:
        """``with tracer.all():`` / ``with tracer.iter[a:b]:`` (nnsight's deprecated form).

        As in nnsight, the body runs once per step, like ``for step in tracer.iter[a:b]:``
        (without a step index): appends give one item per step, and a name bound to a
        ``.save()`` inside holds the last step's value after the block (the last step that
        ran, when the generation ends early). The body runs natively for the first step,
        then again from its source for each further step (:mod:`vinterp.tracing.stepbody`).
        A body that only edits module values (``.steer(v)``, ``x[:] += v``, no names bound,
        nothing saved) means the same run once or per step: it is recorded once for all steps.
        """
        tracer = self._tracer
        if tracer._loop_step is not None:
            raise TracingError(
                f"a `with tracer.iter/all()` scope inside `for step in tracer.iter[...]` (or "
                f"another step scope; at step {tracer._loop_step}) would widen the loop's one "
                "step to several; put the code in the loop body, or the scope outside the loop")
        if self._indices is not None:
            raise TracingError("`with tracer.iter[[...]]` cannot scope a list of steps; write "
                               "`for step in tracer.iter[[...]]:`")
        frame = sys._getframe(1)
        body = stepbody.find(frame)
        if body is None or body.pure:
            # Recorded once for every step of the range (the same as once per step: nothing
            # in the body binds a Python name or saves). Without the source (code run from a
            # string) it cannot run per step: refused at the end if it saved anything.
            self._saved.append((tracer._steps, None, len(tracer.nodes), body is None))
            tracer._steps = Steps(start=self._start, stop=self._stop)
            tracer._step_scopes += 1
            return self
        steps = tracer._unrolled_steps(self._start, self._stop, None)
        self._saved.append((tracer._steps, (frame, body, steps), len(tracer.nodes), False))
        tracer._steps = Steps(start=steps[0], stop=steps[0] + 1)
        tracer._loop_step = steps[0]
        tracer._step_scopes += 1
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        tracer = self._tracer
        outer, plan, first, sourceless = self._saved.pop()
        try:
            if plan is None:
                if exc_type is None and sourceless:
                    self._check_sourceless(first)
                return
            frame, body, steps = plan
            if exc_type is not None or len(steps) < 2:
                return
            rebound = tracer._rebound

            def at_step(step: int) -> None:
                tracer._steps = Steps(start=step, stop=step + 1)
                tracer._loop_step = step

            stepbody.rerun(frame, body, steps[1:], at_step, rebound)
        finally:
            tracer._steps = outer
            tracer._loop_step = None
            tracer._step_scopes -= 1

    def _check_sourceless(self, first: int) -> None:
        """A body recorded once for all steps because its source could not be read must not
        have saved anything: nnsight would give a value per step (appends) or the last one."""
        tracer = self._tracer
        if any(p._id >= first for p in tracer.saved) or any(
                _holds_proxy_from(obj, tracer, first, 0) for obj in tracer._kept):
            raise TracingError(
                "this `with tracer.all()` / `with tracer.iter[...]` block saves values, but "
                "its source cannot be read (code run from a string?), so it cannot run once "
                "per generation step as nnsight does; write `for step in tracer.iter[...]:`")

    def __iter__(self) -> Iterator[int]:
        tracer = self._tracer
        if tracer._loop_step is not None:
            raise TracingError(
                f"`for step in tracer.iter[...]` inside another step loop (at step "
                f"{tracer._loop_step}): each iteration already is one generation step; use "
                "one loop and `if step == ...:` for step-dependent code")
        if tracer._steps.stop is None or tracer._steps.stop - tracer._steps.start > 1:
            raise TracingError(
                "`for step in tracer.iter[...]` inside a `with tracer.all()/iter[a:b]` scope: "
                "the loop already picks its steps; write it outside the `with` scope")
        steps = tracer._unrolled_steps(self._start, self._stop, self._indices)
        outer = tracer._steps
        # the loop's frame: a name its body rebinds each step (``h = ....save()``) keeps the
        # last step that ran when generation stops early, as nnsight's loop ends there
        frame = sys._getframe(1)
        bound = dict(frame.f_locals)
        tracer._step_scopes += 1
        try:
            for step in steps:
                # Everything the body records now belongs to this step only.
                tracer._steps = Steps(start=step, stop=step + 1)
                tracer._loop_step = step
                yield step
                now = frame.f_locals
                for name, value in now.items():
                    tracer._rebound(bound.get(name), value)
                bound = dict(now)
        finally:
            tracer._steps = outer
            tracer._loop_step = None
            tracer._step_scopes -= 1


def _holds_proxy_from(obj: Any, tracer: Tracer, first: int, depth: int) -> bool:
    """Whether a kept container holds a proxy of ``tracer`` recorded at node ``first`` or later."""
    if isinstance(obj, Proxy):
        return obj._tracer is tracer and obj._id >= first
    if depth > _KEEP_DEPTH:
        return False
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple, set)):
        return any(_holds_proxy_from(v, tracer, first, depth + 1) for v in obj)
    return False
