"""Captures in responses: ``[rows, hidden]`` arrays as base64 ``.npy``, inline or stored.

A response carries captures inline until their bytes pass ``Settings.inline_capture_bytes``;
the rest are kept per key for ``capture_ttl`` seconds and fetched with
``GET /v1/captures/{id}`` (an ``.npy`` file). ``index`` is the capture's place in the request's
``capture`` list.

A streamed response carries captures chunk by chunk: each chunk the rows of the steps
completed since the previous one (the prompt's rows first, then one row per generated token),
the chunk that finishes the choice the rest. Concatenating one capture's pieces (same
``index``) in order gives the non-streamed array. A graph's save at one step comes whole in
the chunk after that step (a save over several steps in pieces, like a capture); a save at a
generation step that never ran (the request stopped earlier: EOS, a stop string,
``max_tokens``) is left out, as a step loop in the library keeps only the steps that ran.

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
from vinterp_server.compile import CompiledRequest, npy_bytes
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


def _graph_value(value: Any) -> torch.Tensor:
    """A graph save as one array: per-step lists are stacked (or joined on dim 1)."""
    if not isinstance(value, list):
        return torch.as_tensor(value)
    if not value:
        return torch.zeros(0)
    parts = [torch.as_tensor(v) for v in value]
    try:
        return torch.stack(parts)
    except RuntimeError:
        return torch.cat(parts, dim=1)


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
            if cap is None and value is None and not fragment:
                continue     # a graph's save at a step that never ran (generation ended first)
            if value is None or (isinstance(value, list) and not value):
                if fragment:
                    continue
                value = []   # every row was streamed already (or a graph's empty list)
            if cap is None and isinstance(value, list) and value and isinstance(value[0], tuple):
                # a stream's (step, value) pairs of a graph's save: its steps' values
                value = [v for _, v in value]
                if not spec.graph_save_is_per_step(save_id):
                    (value,) = value
            t = rows(value, spec.model.hidden_size) if cap is not None else _graph_value(value)
            if fragment and t.shape[0] == 0:
                continue
            out.append(await self._item(index, label, cap, t))
        return out

    async def _item(self, index: int, label: str, cap: Any, t: torch.Tensor) -> dict[str, Any]:
        data = npy_bytes(t)
        metrics.CAPTURE_BYTES.inc(len(data))
        item: dict[str, Any] = {
            "index": index, "point": label, "positions": None if cap is None else cap.positions,
            "steps": None if cap is None else cap.steps,
            "dtype": "float32" if t.dtype in (torch.bfloat16, torch.float16)
            else str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
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
