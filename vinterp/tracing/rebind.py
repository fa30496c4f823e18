"""After a trace: make the user's Python names hold real values instead of proxies.

nnsight users write ``h = ....save()`` and use ``h`` as a tensor after the block, and they
append saved proxies to lists and dicts. We swap every saved proxy for its value in the
frame that ran the ``with`` block: in local and global names and inside lists, dicts and
tuples created or filled there.
"""

from __future__ import annotations

import ctypes
import sys
from types import FrameType
from typing import Any

from vinterp.tracing.proxy import Proxy

_MAX_DEPTH = 6


def realize(obj: Any, depth: int = 0) -> tuple[Any, bool]:
    """Return ``(obj with saved proxies replaced, changed?)``; lists/dicts are mutated in place."""
    if isinstance(obj, Proxy):
        return (obj._value, True) if obj._has_value else (obj, False)
    if depth > _MAX_DEPTH:
        return obj, False
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            nv, c = realize(v, depth + 1)
            if c:
                obj[i] = nv
        return obj, False  # mutated in place: the name still points at the same list
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            nv, c = realize(v, depth + 1)
            if c:
                obj[k] = nv
        return obj, False
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        items = [realize(v, depth + 1) for v in obj]
        if any(c for _, c in items):
            return tuple(v for v, _ in items), True
    return obj, False


def rebind_frame(frame: FrameType) -> None:
    """Replace saved proxies in ``frame``'s local (or module-global) names and containers."""
    f_locals = frame.f_locals
    updates = {}
    for name, value in list(f_locals.items()):
        new, changed = realize(value)
        if changed:
            updates[name] = new
    if not updates:
        return
    if frame.f_locals is frame.f_globals:
        frame.f_globals.update(updates)
        return
    for name, value in updates.items():
        f_locals[name] = value
    if sys.version_info < (3, 13):
        # Before PEP 667 the f_locals dict is a snapshot: push it back into the fast locals.
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
