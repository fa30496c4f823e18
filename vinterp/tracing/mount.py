"""``.save()`` on any Python object while a trace is being recorded (nnsight's "pymount").

nnsight code writes ``steps = list().save()`` and then appends values inside the trace,
expecting ``steps`` to hold real tensors after the block. A builtin ``list`` has no ``save``
method, so nnsight mounts one on ``object`` itself (its ``_c/py_mount.c``). We do the same
with ctypes, but only while a trace block is open: the moment the block ends (before the
model runs) the method is removed again, so no other code ever sees ``object.save``.

``obj.save()`` on a plain object registers it with the innermost open tracer, which saves
every proxy found inside it when the block ends and replaces them with their values after
the run (see :meth:`vinterp.tracing.tracer.Tracer.keep`). It returns ``obj`` itself, so
``x = list().save()`` binds the list.

Known limit (nnsight's too): while mounted, every object answers ``hasattr(x, "save")``, so a
C extension imported for the first time inside a trace block that defines its own ``save``
(pybind11 checks for an existing attribute) refuses to load. Import such modules before the
block; vinterp itself imports nothing while user code records.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer

_lock = threading.Lock()
_active: list[Tracer] = []


def _object_dict() -> dict[str, Any]:
    # ``object.__dict__`` is a read-only mappingproxy; its one referent is the real type dict.
    (real,) = gc.get_referents(object.__dict__)
    return real  # type: ignore[no-any-return]


def _save(self: Any) -> Any:
    """``obj.save()`` for a plain object inside a trace: keep it for the tracer, return it."""
    with _lock:
        tracer = _active[-1] if _active else None
    if tracer is None:  # (a stale bound method called after the block: nothing to record)
        return self
    return tracer.keep(self)


def _modified() -> None:
    # Types cache attribute lookups; tell CPython object's dict (and so every type's MRO) changed.
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(object))


def push(tracer: Tracer) -> None:
    """A trace block opened: mount ``object.save`` (once, however deeply traces nest)."""
    with _lock:
        _active.append(tracer)
        if len(_active) == 1:
            _object_dict()["save"] = _save
            _modified()


def pop(tracer: Tracer) -> None:
    """A trace block closed: unmount ``object.save`` when no trace block is open any more."""
    with _lock:
        if tracer in _active:
            _active.remove(tracer)
        if not _active and _object_dict().get("save") is _save:
            del _object_dict()["save"]
            _modified()
