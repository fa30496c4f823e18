"""``model.edit()``: a tracer that records persistent edits of a model instead of running.

Separate from the tracer: it is a subclass with its own ending (the recorded nodes become an
edit every later trace runs first, see ``build._edit_nodes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vinterp import ir
from vinterp.ir.schema import Node
from vinterp.tracing import shapes
from vinterp.tracing.errors import TracingError
from vinterp.tracing.tracer import Tracer

if TYPE_CHECKING:
    from vinterp.language_model import LanguageModel


class _Edit:
    """One ``model.edit()`` block: its nodes (invoke 0, ids from 0) and tensor constants."""

    def __init__(self, nodes: list[Node], tensors: list[ir.TensorData]) -> None:
        self.nodes, self.tensors = nodes, tensors


class EditTracer(Tracer):
    """``with model.edit() as edited:``: records edits instead of running them.

    The body is recorded like a trace over a stand-in prompt; at the end its nodes become a
    persistent edit of a new model sharing the weights and backend (or of the model itself
    with ``inplace=True``), which every later trace of it runs first (see
    ``build._edit_nodes``). ``.save()`` inside an edit saves nothing.
    """

    def __init__(self, lm: LanguageModel, inputs: Any = None, *, inplace: bool = False
                 ) -> None:
        super().__init__(lm, "trace", inputs if inputs is not None else "Hello")
        self.inplace = inplace
        if inplace:
            self.target = lm
        else:
            import copy

            self.target = copy.copy(lm)
            self.target._edits = list(lm._edits)
            # (the tracer stack stays shared: inside `edited.trace()`, code may name either)

    def known_shape(self, node_id: int) -> Any:
        """The structure only (a tensor's rank): the body is recorded over a stand-in prompt,
        and a size read from it would be a constant in every later trace (``x.shape[1]`` of
        "Hello" is 1, whatever the prompt). Sizes stay values the edit reads when it runs."""
        return shapes.known_shape(self, node_id, exact=False)

    def __enter__(self) -> Any:  # type: ignore[override]
        super().__enter__()
        if self.inplace:
            return self
        return _EditedPair(self, self.target)

    def _run(self) -> None:
        self.finished = True
        if self._post:
            raise TracingError("an edit cannot use the generated token ids")
        if any(n.op in ("backward", "stop") for n in self.nodes):
            raise TracingError("model.edit() records edits of the forward; backward() and "
                               "stop() belong in a trace")
        nodes = [n.model_copy(update={"invoke": 0 if n.invoke >= 0 else -1})
                 for n in self.nodes]
        if any(n.invoke < 0 for n in nodes):
            raise TracingError("model.edit() records one prompt's edits: write them without "
                               "tracer.invoke blocks")
        self.target._edits.append(_Edit(nodes, list(self.tensors)))
        self._frame = None


class _EditedPair(tuple):  # type: ignore[type-arg]
    """What ``with model.edit() as ...`` binds: nnsight 0.8's ``(tracer, edited)`` pair, which
    also behaves as the edited model itself (the older ``as edited`` spelling)."""

    def __new__(cls, tracer: EditTracer, edited: Any) -> _EditedPair:
        return super().__new__(cls, (tracer, edited))

    def __getattr__(self, name: str) -> Any:
        return getattr(self[1], name)
