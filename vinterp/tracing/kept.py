"""Plain objects kept with ``.save()`` (``list().save()``): the proxies inside them.

Before the run every proxy inside such an object is saved; after it, the proxies of steps
that never ran are dropped. Separate from the tracer: walks of user containers, not recording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vinterp.tracing.proxy import Proxy

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer

#: how deep ``list().save()``-kept containers are searched for proxies
_KEEP_DEPTH = 6


def _save_inside(obj: Any, tracer: Tracer, saved: set[int], depth: int) -> Any:
    """Replace unsaved proxies inside ``obj`` (in place for lists/dicts) by saved ones."""
    if isinstance(obj, Proxy):
        if obj._tracer is not tracer or obj._id in saved:
            return obj
        new = tracer._save_as_recorded(obj)
        saved.add(new._id)
        return new
    if depth > _KEEP_DEPTH:
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _save_inside(v, tracer, saved, depth + 1)
    elif isinstance(obj, dict):
        for k, v in list(obj.items()):
            obj[k] = _save_inside(v, tracer, saved, depth + 1)
    elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_save_inside(v, tracer, saved, depth + 1) for v in obj)
    return obj


def _drop_proxies(obj: Any, ids: set[int], depth: int) -> None:
    """Remove items that are proxies of ``ids`` from lists and dicts inside ``obj``."""
    if not ids or depth > _KEEP_DEPTH:
        return
    if isinstance(obj, list):
        obj[:] = [v for v in obj if not (isinstance(v, Proxy) and v._id in ids)]
        for v in obj:
            _drop_proxies(v, ids, depth + 1)
    elif isinstance(obj, dict):
        for k, v in list(obj.items()):
            if isinstance(v, Proxy) and v._id in ids:
                del obj[k]
            else:
                _drop_proxies(v, ids, depth + 1)
