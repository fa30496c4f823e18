"""``PUT/GET/DELETE /v1/vectors/{name}`` and ``GET /v1/vectors``: a key's named vectors.

The PUT body is a safetensors file: one tensor of any name (the same vector at every layer
it is applied to) or one tensor per layer, named by the layer's index. Shapes are checked
against the model. A vector is visible to the key that uploaded it only; use it by name in
``interventions`` (``"vector": {"name": "happy"}``).

Example::

    curl -X PUT --data-binary @happy.safetensors -H "Authorization: Bearer $KEY" \\
        http://127.0.0.1:8000/v1/vectors/happy
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vinterp.steering.vectors import by_layer, layer_of
from vinterp_server.auth import KeyInfo
from vinterp_server.compile import FieldError, check_vector
from vinterp_server.context import Server, require_key, server
from vinterp_server.errors import error_response
from vinterp_server.limits import TooLarge

router = APIRouter()
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")   # (fullmatch: "$" would let a final "\n" in)


def parse_vectors(data: bytes, hidden: int, num_layers: int) -> dict[int | None, torch.Tensor]:
    """A safetensors body as layer → vector (``None``: every layer); raises ``ValueError``."""
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise ValueError(f"the body is not a safetensors file: {exc}") from None
    if not tensors:
        raise ValueError("the safetensors file holds no tensor")
    if len(tensors) == 1:
        ((name, t),) = tensors.items()
        try:
            layer_of(name)
        except ValueError:   # a name that is no layer's: the vector for every layer
            return {None: check_vector(t.reshape(-1) if t.dim() == 2 and t.shape[0] == 1
                                       else t, hidden)}
    # keys name layers as the library reads them (``8``, ``layers.8``, ``model.layers.8.mlp``),
    # so one file means the same vectors to both
    try:
        by_name = {name: layer_of(name) for name in tensors}
        by_layer(by_name.items())   # (two names of one layer: refused, naming both)
    except ValueError as exc:
        raise ValueError(f"{exc} (with several tensors, name each by its layer: 0.."
                         f"{num_layers - 1})") from None
    out: dict[int | None, torch.Tensor] = {}
    for name, t in tensors.items():
        layer = by_name[name]
        if not 0 <= layer < num_layers:
            raise ValueError(f"tensor {name!r}: layer {layer} is out of range (the model has "
                             f"{num_layers} layers)")
        try:
            out[layer] = check_vector(t, hidden)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
    return out


#: store reads one request makes at once while it fetches its named vectors
FETCH_BATCH = 16


async def stored_vectors(srv: Server, key: KeyInfo,
                         names: Sequence[str]) -> dict[str, dict[int | None, torch.Tensor]]:
    """The key's vectors of these names (in the order compiling meets them), fetched a batch
    at a time up to the first that does not exist: compiling stops there with a 400 naming
    it. More names than the key's graph may have nodes is a 413 before any read."""
    if len(names) > key.limits.graph_nodes:   # (each use of a vector is at least one node)
        raise TooLarge(f"the request names {len(names)} stored vectors; a graph of this key "
                       f"may have at most {key.limits.graph_nodes} nodes")
    found: dict[str, dict[int | None, torch.Tensor]] = {}
    for start in range(0, len(names), FETCH_BATCH):
        batch = names[start:start + FETCH_BATCH]
        values = await asyncio.gather(*(srv.store.get(key.id, "vector", n) for n in batch))
        found.update((n, v) for n, v in zip(batch, values) if v is not None)
        if len(found) < start + len(batch):
            break
    return found


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise HTTPException(400, f"vector name {name!r}: use 1-128 letters, digits, '_', '-', "
                                 f"'.'")


@router.put("/v1/vectors/{name}", status_code=201)
async def put_vector(name: str, request: Request, key: KeyInfo = Depends(require_key),
                     srv: Server = Depends(server)) -> Any:
    """Upload (or replace) a named vector."""
    _check_name(name)
    m = srv.host.model
    try:
        vectors = parse_vectors(await request.body(), m.hidden_size, m.num_layers)
    except ValueError as exc:
        return error_response(FieldError("body", str(exc)))
    await srv.store.put(key.id, "vector", name, vectors, None)
    return {"name": name, "layers": sorted(k for k in vectors if k is not None) or "all",
            "hidden_size": m.hidden_size}


@router.get("/v1/vectors")
async def list_vectors(key: KeyInfo = Depends(require_key),
                       srv: Server = Depends(server)) -> Any:
    """This key's vector names."""
    return {"vectors": await srv.store.names(key.id, "vector")}


@router.get("/v1/vectors/{name}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_vector(name: str, key: KeyInfo = Depends(require_key),
                     srv: Server = Depends(server)) -> Response:
    """The vector as a safetensors file (as uploaded: ``vector`` or one per layer index)."""
    vectors = await srv.store.get(key.id, "vector", name)
    if vectors is None:
        raise HTTPException(404, f"no vector named {name!r} for this key")
    tensors = {("vector" if k is None else str(k)): v.contiguous() for k, v in vectors.items()}
    return Response(st_save(tensors), media_type="application/octet-stream")


@router.delete("/v1/vectors/{name}")
async def delete_vector(name: str, key: KeyInfo = Depends(require_key),
                        srv: Server = Depends(server)) -> Any:
    """Delete a named vector."""
    if not await srv.store.delete(key.id, "vector", name):
        raise HTTPException(404, f"no vector named {name!r} for this key")
    return {"deleted": name}
