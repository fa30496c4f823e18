"""Captures in responses: ``[rows, hidden]`` arrays as base64 ``.npy``, inline or stored.

A response carries captures inline until their bytes pass ``Settings.inline_capture_bytes``;
the rest are kept per key for ``capture_ttl`` seconds and fetched with
``GET /v1/captures/{id}`` (an ``.npy`` file). ``index`` is the capture's place in the request's
``capture`` list.

A streamed response carries captures chunk by chunk: each chunk the rows of the steps
completed since the previous one (the prompt's rows first, then one row per generated token),
the chunk that finishes the choice the rest. Concatenating one capture's pieces (same
``index``) in order gives the non-streamed array.

A graph's save comes as one item per step it ran at, each with its ``step`` and the value as
the library has it at that step (a step's shape may differ from the next one's: the prompt's
forward holds every prompt row, a generated step one), streamed or not: a streamed item comes
whole in the chunk after its step. A save at a generation step that never ran (the request
stopped earlier: EOS, a stop string, ``max_tokens``) is left out, as a step loop in the
library keeps only the steps that ran. A save holding a tuple or list of tensors
(``topk``'s values and indices, ``split``'s chunks) comes as one item per element and step,
its place in the tuple in ``part`` (``POST /v1/traces`` returns the same tuple); a save
holding something that is neither a tensor nor a number (a ``dtype``, a ``device``) is a
400 naming the save node.

Example (one capture in a response)::

    {"point": "layers.8.output", "positions": "last", "steps": "prompt",
     "dtype": "float32", "shape": [1, 576], "data": "k05VTVBZ..."}
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import torch
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from vinterp_server import metrics
from vinterp_server.auth import KeyInfo
from vinterp_server.compile import CompiledRequest, FieldError, npy_bytes
from vinterp_server.context import Server, require_key, server

router = APIRouter()


def rows(value: Any, hidden: int = 0) -> torch.Tensor:
    """A shortcut capture's saved value (one tensor, or one per step; ``(step, value)`` pairs
    from a stream) as ``[rows, hidden]``."""
    parts = value if isinstance(value, list) else [value]
    parts = [p[1] if isinstance(p, tuple) else p for p in parts]
    if not parts:
        return torch.zeros(0, hidden)
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=0)


def _graph_steps(spec: CompiledRequest, save_id: int, value: Any,
                 streamed: bool = False) -> list[tuple[int, Any]]:
    """A graph save's ``(step, value)`` per step it ran at: a stream hands over such pairs
    (``streamed``); a finished request's save over several steps is the list of the steps
    that ran, from its first (they run in order, and only the last ones can be missing).
    (Told, not guessed from the value: a list of tuples may be one save's ``topk`` per
    step.)"""
    if streamed:
        return value
    steps = spec.graph_save_steps(save_id)
    if steps.stop is None or steps.stop - steps.start > 1:
        return [(steps.start + i, v) for i, v in enumerate(value)]
    return [(steps.start, value)]


def _graph_arrays(spec: CompiledRequest, save_id: int, value: Any
                  ) -> list[tuple[int | None, torch.Tensor]]:
    """A graph save's value at one step as ``(part, array)``: a tensor, a number or a
    sequence of numbers (a shape) is one array (part ``None``); a tuple or list holding
    tensors (``topk``'s values and indices, ``split``'s chunks) is one array per element,
    ``part`` its place in it, as ``POST /v1/traces`` returns the same save as a tuple (a
    ``None`` element, such as an attention module's missing weights, is left out). Anything
    else is a :class:`FieldError` naming the save node and what to save instead."""
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return [(i, _array(spec, save_id, v)) for i, v in enumerate(value) if v is not None]
    return [(None, _array(spec, save_id, value))]


def _array(spec: CompiledRequest, save_id: int, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (str, bytes)):   # (numbers; as_tensor would split strings)
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    assert spec.user_graph is not None
    own = save_id - len(spec.nodes)   # the user's node id (see CompiledRequest.graph_for)
    k, node = next((k, n) for k, n in enumerate(spec.user_graph.nodes) if n.id == own)
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")
    raise FieldError(f"graph.nodes[{k}]", f"save node {node.id} holds a {name}, which a "
                                          f"response cannot carry; save a tensor, a number, "
                                          f"or a tuple or list of tensors (a capture names its "
                                          f"array's dtype and shape already; for another "
                                          f"object, save a tensor or number computed from it)")


class CaptureWriter:
    """Encodes one response's captures, storing those past the inline budget."""

    def __init__(self, srv: Server, key: KeyInfo) -> None:
        self.srv = srv
        self.key = key
        self.inline_left = srv.settings.inline_capture_bytes

    async def encode(self, spec: CompiledRequest, saves: dict[int, Any], *,
                     fragment: bool = False) -> list[dict[str, Any]]:
        """The captures in ``saves`` (a finished request's, or with ``fragment=True`` the
        steps a stream hands over now: captures with nothing new are left out)."""
        out = []
        for index, (save_id, cap, label) in enumerate(spec.capture_points()):
            value = saves.get(save_id)
            if cap is None:
                # a graph's save: one item per step that ran (none for a step that never ran:
                # generation ended first; nothing new in this stream chunk)
                steps = [] if value is None else _graph_steps(spec, save_id, value, fragment)
                for step, v in steps:
                    for part, t in _graph_arrays(spec, save_id, v):
                        out.append(await self._item(index, label, None, t, step, part))
                continue
            if value is None or (isinstance(value, list) and not value):
                if fragment:
                    continue
                value = []   # every row was streamed already
            t = rows(value, spec.model.hidden_size)
            if fragment and t.shape[0] == 0:
                continue
            out.append(await self._item(index, label, cap, t))
        return out

    async def _item(self, index: int, label: str, cap: Any, t: torch.Tensor,
                    step: int | None = None, part: int | None = None) -> dict[str, Any]:
        data = npy_bytes(t)
        metrics.CAPTURE_BYTES.inc(len(data))
        item: dict[str, Any] = {
            "index": index, "point": label, "positions": None if cap is None else cap.positions,
            "steps": None if cap is None else cap.steps,
            "dtype": "float32" if t.dtype in (torch.bfloat16, torch.float16)
            else str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if step is not None:
            item["step"] = step
        if part is not None:
            item["part"] = part
        if len(data) <= self.inline_left:
            self.inline_left -= len(data)
            item["data"] = base64.b64encode(data).decode("ascii")
        else:
            cid = f"cap-{uuid.uuid4().hex}"
            await self.srv.store.put(self.key.id, "capture", cid, data,
                                     self.srv.settings.capture_ttl)
            item["id"] = cid
        return item


@router.get("/v1/captures/{capture_id}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_capture(capture_id: str, key: KeyInfo = Depends(require_key),
                      srv: Server = Depends(server)) -> Response:
    """A stored capture (an ``.npy`` file); 404 once expired or if it is not this key's."""
    data = await srv.store.get(key.id, "capture", capture_id)
    if data is None:
        raise HTTPException(404, f"no capture {capture_id!r} for this key (expired after "
                                 f"{int(srv.settings.capture_ttl)} s, or never existed)")
    return Response(content=data, media_type="application/octet-stream")
