"""The server's request and response fields (pydantic v2; they are what ``/openapi.json`` shows).

OpenAI requests gain three optional top-level fields (with the ``openai`` client, pass them in
``extra_body``):

* ``interventions``: steering ops at decoder layers (:class:`Intervention`);
* ``capture``: activations to return (:class:`Capture`);
* ``graph``: a full intervention graph (vinterp's IR) for anything else.

All three compile to the same IR the library produces (see :mod:`vinterp_server.compile`).

Example (JSON body of ``POST /v1/chat/completions``)::

    {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
     "interventions": [{"op": "steer", "layers": [8], "vector": {"name": "happy"},
                        "scale": 4.0}],
     "capture": [{"point": "layers.8.output", "positions": "last"}]}
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, field_validator, model_validator,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vinterp.ir import IR_VERSION

#: where a request's context rides in ``SamplingParams.extra_args`` between vLLM's serving code
#: and the server's engine client (popped there, before the params reach the engine)
CONTEXT_KEY = "vinterp_context"

#: the context of the HTTP request being served, for the engine requests vLLM makes on its own
#: while serving it, with sampling params of its own making that carry no ``CONTEXT_KEY``
#: (beam search: one request per beam and step); set by ``attach``, read by the engine client
CURRENT_CONTEXT: ContextVar[Any] = ContextVar("vinterp_request_context", default=None)

#: dtypes a vector may be sent in (base64 of little-endian bytes)
VectorDType = Literal["float32", "float16", "bfloat16", "float64"]
PositionWord = Literal["prompt", "generated", "all"]


class _Field(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VectorSpec(_Field):
    """A steering vector: by ``name`` (uploaded with ``PUT /v1/vectors/{name}``), inline
    ``values``, or ``base64`` bytes with a ``dtype``. Exactly one of the three."""

    name: str | None = Field(None, description="a named vector of this API key")
    values: list[float] | None = Field(None, description="the vector, one number per dim")
    base64: str | None = Field(None, description="little-endian bytes of the vector, base64")
    dtype: VectorDType = Field("float32", description="dtype of `base64`")

    @model_validator(mode="after")
    def _one_source(self) -> VectorSpec:
        given = [k for k in ("name", "values", "base64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of name, values, base64 "
                             f"(got {', '.join(given) or 'none'})")
        if self.values is not None and not all(math.isfinite(x) for x in self.values):
            raise ValueError("values must be finite numbers (no NaN or inf)")
        return self


def _finite(v: float | None, name: str) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number (no NaN or inf)")
    return v


class Intervention(_Field):
    """One steering op applied at the output (residual stream) of decoder layers.

    ``steer`` adds ``scale * vector``; ``scale`` multiplies by ``factor``; ``ablate`` projects
    the direction ``vector`` out; ``clamp`` clamps the projection onto ``vector`` to
    ``[min, max]``; ``replace`` sets the value to ``vector``. ``positions`` selects tokens:
    the prompt, generated tokens, all, or absolute positions (negative: from the prompt's end).
    """

    op: Literal["steer", "scale", "ablate", "clamp", "replace"]
    layers: StrictInt | list[StrictInt] | Literal["all"] = Field(
        description="decoder layer index, list of indices, or \"all\"")
    vector: VectorSpec | None = Field(None, description="needed by steer/ablate/clamp/replace")
    scale: float = Field(1.0, description="steer: multiplier of the vector")
    factor: float | None = Field(None, description="scale: the factor")
    min: float | None = Field(None, description="clamp: lower bound of the projection")
    max: float | None = Field(None, description="clamp: upper bound of the projection")
    positions: PositionWord | list[int] = "all"

    @model_validator(mode="after")
    def _complete(self) -> Intervention:
        for name in ("scale", "factor", "min", "max"):
            _finite(getattr(self, name), name)
        if self.op != "scale" and self.vector is None:
            raise ValueError(f"op {self.op!r} needs a vector")
        if self.op == "scale" and self.factor is None:
            raise ValueError("op 'scale' needs a factor")
        if self.op == "clamp" and self.min is None and self.max is None:
            raise ValueError("op 'clamp' needs min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clamp: min {self.min} is above max {self.max}")
        if isinstance(self.positions, list) and not self.positions:
            raise ValueError("positions: give at least one position, or 'all', 'prompt' or "
                             "'generated'")
        return self


class Capture(_Field):
    """Activations to return: a module point, which token positions, at which steps.

    ``point``: ``layers.8.output`` (the residual stream after layer 8), ``layers.8.mlp.output``,
    ``layers.8.attn.output``, ``layers.8.input``, ``embed.output``, ``final_norm.output``, or any
    HF module path with ``.output`` / ``.input`` (``model.layers.8.mlp.output``).
    The returned array is ``[rows, hidden]``, rows in token order: the prompt's selected
    positions (step ``prompt``) and then one row per generated token (steps ``generated``).
    """

    point: str
    positions: Literal["last", "all"] | list[int] = "last"
    steps: PositionWord = "prompt"


class InterventionFields(BaseModel):
    """The fields vinterp adds to OpenAI requests."""

    _vinterp_context: Any = PrivateAttr(default=None)

    interventions: list[Intervention] | None = Field(
        None, description="steering ops (vinterp)")
    capture: list[Capture] | None = Field(None, description="activations to return (vinterp)")
    graph: dict[str, Any] | None = Field(
        None, description="an intervention graph (vinterp IR, one invoke) run on this "
                          "request's prompt; its saves come back in `captures`")

    def has_vinterp(self) -> bool:
        """Whether the request asks for any intervention or capture."""
        return bool(self.interventions or self.capture or self.graph)


    def attach(self, context: Any) -> None:
        """Hand ``context`` to the engine client with every prompt's sampling params, and as
        :data:`CURRENT_CONTEXT` of the task serving this request (and the tasks it starts),
        so the engine requests vLLM makes on its own are counted too."""
        self._vinterp_context = context
        CURRENT_CONTEXT.set(context)

    def attached(self) -> Any:
        """The context :meth:`attach` gave (``None`` if none)."""
        return self._vinterp_context

    def detached(self) -> Any:
        """A copy of this request without its context (to send to another process)."""
        copy = self.model_copy()
        copy._vinterp_context = None
        return copy

    def _with_context(self, params: Any) -> Any:
        # vLLM calls to_sampling_params once per rendered prompt, then engine.generate with
        # them: the context rides along and the engine client takes it out again.
        if self._vinterp_context is not None:
            params.extra_args = {**(params.extra_args or {}), CONTEXT_KEY: self._vinterp_context}
        return params


class VinterpCompletionRequest(CompletionRequest, InterventionFields):
    """``POST /v1/completions`` with vinterp's fields."""

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self._with_context(super().to_sampling_params(*args, **kwargs))


class VinterpChatCompletionRequest(ChatCompletionRequest, InterventionFields):
    """``POST /v1/chat/completions`` with vinterp's fields."""

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self._with_context(super().to_sampling_params(*args, **kwargs))


class CaptureOut(BaseModel):
    """One capture in a response: inline ``.npy`` (base64) or a reference to fetch."""

    point: str
    positions: Any = None
    steps: str | None = None
    step: int | None = Field(None, description="a graph's save: the generation step of this "
                                                "value (0: the prompt's forward)")
    dtype: str
    shape: list[int]
    data: str | None = Field(None, description="base64 of an .npy file (inline captures)")
    id: str | None = Field(None, description="stored capture: GET /v1/captures/{id}")


class TraceRequest(_Field):
    """``POST /v1/traces``: a whole trace or generate graph (many invokes) to run, or a
    session (``model.session(remote=True)``): several graphs run in order as one request,
    later ones using earlier ones' saves (``SessionValue`` tensors); the result is then
    ``{"traces": [result, ...]}``."""

    graph: dict[str, Any] | None = Field(None, description="vinterp IR graph "
                                                           "(`tracer.to_json()`)")
    session: list[dict[str, Any]] | None = Field(
        None, description="several IR graphs run in order (instead of `graph`)")
    ir_version: int = Field(IR_VERSION, description="the client's IR version")
    blocking: bool = Field(True, description="false: return an id to poll at once")

    @model_validator(mode="after")
    def _one_of(self) -> TraceRequest:
        if (self.graph is None) == (self.session is None):
            raise ValueError("give exactly one of 'graph' (one trace) and 'session' (a list "
                             "of graphs run in order)")
        if self.session is not None and not self.session:
            raise ValueError("'session' needs at least one graph")
        return self

    @field_validator("ir_version")
    @classmethod
    def _same_version(cls, v: int) -> int:
        if v != IR_VERSION:
            raise ValueError(f"this server speaks IR version {IR_VERSION} and the client sent "
                             f"version {v}; install a vinterp whose IR version matches")
        return v


class TraceStatus(BaseModel):
    """A trace's state; ``result`` once done (see :mod:`vinterp.ir.results`)."""

    id: str
    status: Literal["queued", "running", "done", "failed"]
    ir_version: int = IR_VERSION
    result: dict[str, Any] | None = None
    error: str | None = None
    code: int | None = Field(None, description="a failed trace's HTTP status (429: a "
                                                "limit, 413: too large, 503: the server "
                                                "stopped, 500: the intervention failed)")
    updated: float | None = Field(None, description="when a queued or running trace was "
                                                    "last seen alive (Unix time)")
