"""The per-request payload: what a vLLM request carries in ``SamplingParams.extra_args``.

Everything is plain JSON (strings, ints, dicts) so it crosses vLLM's msgpack transport, the
HTTP server and ``AsyncLLM`` unchanged. The graph travels as IR JSON and is validated again in
the worker (``vinterp.ir.load``): a worker never trusts a payload.

Example::

    >>> p = Payload(key="run1/0/0", graph_json='{"nodes": []}', invoke=0, mode="trace")
    >>> Payload.from_extra_args(p.to_extra_args()) == p
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vinterp_vllm.wire import copies, pack, unpack

#: the key under ``SamplingParams.extra_args`` that holds a vinterp payload.
EXTRA_ARGS_KEY = "vinterp"
#: default cap on what one request may capture (bytes).
DEFAULT_CAPTURE_CAP = 512 * 2**20


@dataclass(frozen=True)
class Payload:
    """One request's intervention: the graph, which invoke's nodes are its own, and limits.

    ``key`` is the caller's own request key (vLLM appends random suffixes to request ids);
    captures are drained from the worker under it. ``imports`` holds values of other invokes'
    nodes (cross-invoke dependencies, already computed in an earlier phase) as IR tensor
    dicts; ``exports`` lists node ids whose values the caller needs back for a later phase.
    """

    key: str
    graph_json: str
    invoke: int = 0
    mode: str = "trace"
    capture_cap: int = DEFAULT_CAPTURE_CAP
    imports: dict[str, Any] = field(default_factory=dict)
    exports: tuple[int, ...] = ()

    def to_extra_args(self) -> dict[str, Any]:
        """The ``extra_args`` entry for ``SamplingParams``."""
        return {EXTRA_ARGS_KEY: {
            "key": self.key, "graph": self.graph_json, "invoke": self.invoke,
            "mode": self.mode, "capture_cap": self.capture_cap, "imports": self.imports,
            "exports": list(self.exports),
        }}

    @classmethod
    def from_extra_args(cls, extra: dict[str, Any] | None) -> Payload | None:
        """The payload in ``extra_args``, or ``None`` for a plain request.

        Raises :class:`PayloadError` when the entry is malformed: anyone who can reach a
        ``vllm serve`` built with the plugin can send ``vllm_xargs={"vinterp": ...}``, and the
        worker must fail that request alone, not index into a string inside the forward."""
        if not isinstance(extra, dict) or EXTRA_ARGS_KEY not in extra:
            return None
        d = extra[EXTRA_ARGS_KEY]
        where = f"SamplingParams.extra_args[{EXTRA_ARGS_KEY!r}]"
        if not isinstance(d, dict):
            raise PayloadError(f"{where} must be a dict (Payload.to_extra_args() makes one), "
                               f"not {type(d).__name__}")
        key = d.get("key")
        if not isinstance(key, str) or not key:
            raise PayloadError(f"{where}['key'] must be a non-empty string (the caller's "
                               f"request key), not {key!r}")

        def bad(what: str, value: Any) -> PayloadError:
            return PayloadError(f"{where}[{what!r}] must be {_EXPECTED[what]}, not "
                                f"{value!r:.80}; build the entry with Payload(...)."
                                f"to_extra_args()", key)

        graph = d.get("graph")
        if not isinstance(graph, str):
            raise bad("graph", graph)
        invoke = d.get("invoke", 0)
        if not _is_int(invoke) or invoke < 0:
            raise bad("invoke", invoke)
        mode = d.get("mode", "trace")
        if not isinstance(mode, str):
            raise bad("mode", mode)
        cap = d.get("capture_cap", DEFAULT_CAPTURE_CAP)
        if not _is_int(cap) or cap < 0:
            raise bad("capture_cap", cap)
        imports = d.get("imports") or {}
        if not isinstance(imports, dict):
            raise bad("imports", imports)
        exports = d.get("exports") or ()
        if not isinstance(exports, (list, tuple)) or not all(_is_int(x) for x in exports):
            raise bad("exports", exports)
        return cls(key=key, graph_json=graph, invoke=invoke, mode=mode, capture_cap=cap,
                   imports=dict(imports), exports=tuple(exports))


class PayloadError(ValueError):
    """A malformed ``extra_args["vinterp"]`` entry; ``key`` is its request key when that part
    could be read (the worker then reports the failure under it)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_EXPECTED = {"graph": "the graph's IR JSON text (a string)",
             "invoke": "a non-negative int (the invoke whose nodes are this request's)",
             "mode": "a string ('trace' or 'generate')",
             "capture_cap": "a non-negative int (bytes)",
             "imports": "a dict of node id to IR tensor dict",
             "exports": "a list of int node ids"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Outcome:
    """What the worker hands back for one request key.

    ``saves``: save-node id → value (list per step inside scopes). ``error``: why the request's
    intervention failed (the request itself still finished). ``retry_alone``: the failure was
    only a scheduling accident (its prompt was split across chunks, or vLLM preempted it)
    and running it alone fixes it. ``too_large``: it failed because its captures passed its
    cap (the caller asked for too much: a 413 on a server, not a 500).
    """

    saves: dict[int, Any] = field(default_factory=dict)
    exports: dict[int, Any] = field(default_factory=dict)
    error: str | None = None
    retry_alone: bool = False
    too_large: bool = False


def outcomes_to_wire(outcomes: dict[str, Outcome]) -> bytes:
    """Outcomes as one bytes blob: what ``vinterp_drain`` returns over ``collective_rpc``.

    With the engine core in another process (always under ``AsyncLLM``), vLLM's msgpack RPC
    hands nested tensors of an RPC result back as unresolved buffer references, so captures
    would arrive as ``['float32', [1, 10, 64], 1]``. Bytes cross every transport unchanged
    (see ``wire.py``). Only a caller sharing the worker's process skips them
    (:func:`own_copies`).
    """
    return pack({k: (o.saves, o.exports, o.error, o.retry_alone, o.too_large)
                 for k, o in outcomes.items()})


def own_copies(outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
    """The outcomes, each tensor its own copy: what ``outcomes_from_wire(outcomes_to_wire(
    outcomes))`` gives, without the trip through bytes (for a caller in the worker's own
    process: an in-process engine core). Copies, not the worker's views: one capture must
    not keep (or ``torch.save``) the rows of every request gathered with it."""
    for o in outcomes.values():
        o.saves = copies(o.saves)
        o.exports = copies(o.exports)
    return outcomes


def outcomes_from_wire(data: bytes) -> dict[str, Outcome]:
    """The outcomes of :func:`outcomes_to_wire` (from this client's own engine: trusted)."""
    return {k: Outcome(saves=s, exports=e, error=err, retry_alone=r, too_large=big)
            for k, (s, e, err, r, big) in unpack(data).items()}
