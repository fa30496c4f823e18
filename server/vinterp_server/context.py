"""What every route needs: the engine host, keys, store, limiter and settings, and the
``Authorization: Bearer`` check.

Example::

    @router.get("/v1/things")
    async def things(key: KeyInfo = Depends(require_key), server: Server = Depends(server)):
        ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request

from vinterp_server.auth import ApiKeys, KeyInfo
from vinterp_server.limits import Limiter
from vinterp_server.store import Store

if TYPE_CHECKING:  # (the CLI imports Settings without loading vLLM)
    from vinterp_server.engine import EngineHost


@dataclass(frozen=True)
class Settings:
    """Server-wide settings (``vinterp serve`` flags)."""

    inline_capture_bytes: int = 4 * 2**20   # captures past this (per response) are stored
    capture_ttl: float = 3600.0             # seconds a stored capture is kept
    trace_ttl: float = 3600.0               # seconds a trace's result is kept
    max_body_bytes: int = 64 * 2**20        # larger request bodies get 413
    shutdown_timeout: float = 30.0          # seconds requests in flight get to finish at stop


@dataclass
class Server:
    """The app's state (``app.state.vinterp``)."""

    host: EngineHost
    keys: ApiKeys
    store: Store
    settings: Settings = field(default_factory=Settings)
    limiter: Limiter = field(init=False)
    tasks: set[Any] = field(default_factory=set)   # background traces

    def __post_init__(self) -> None:
        self.limiter = Limiter(self.store)


#: who calls when the server runs without keys (loopback only)
ANONYMOUS = "anonymous"


def server(request: Request) -> Server:
    """The app's :class:`Server` (a FastAPI dependency)."""
    return request.app.state.vinterp


def require_key(request: Request) -> KeyInfo:
    """The caller's key from ``Authorization: Bearer <key>``; 401 without a valid one."""
    srv: Server = request.app.state.vinterp
    if len(srv.keys) == 0:
        return KeyInfo(id=ANONYMOUS, limits=srv.keys.defaults)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    info = srv.keys.lookup(token.strip()) if scheme.lower() == "bearer" else None
    if info is None:
        raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer "
                                 "<key>'", headers={"WWW-Authenticate": "Bearer"})
    return info
