"""A request's worker state (``request_state.py``) without an engine: what its captures
are charged against the request's cap."""

from __future__ import annotations

import torch
from helpers import capture_graph
from vinterp_vllm.layout import RowSpan
from vinterp_vllm.payload import Payload
from vinterp_vllm.request_state import ParsedGraphs, RequestState

from vinterp.ir import dumps
from vinterp.models.architectures import for_model_type


def test_recomputed_rows_are_charged_once() -> None:
    """vLLM recomputes a preempted request's rows; they are captured once, so they count
    once. Charging them again failed requests within their cap, depending on scheduling."""
    graph, _ = capture_graph([list(range(3, 13))], ["model.layers.0"], mode="generate")
    row_bytes = 64 * 4
    payload = Payload(key="k", graph_json=dumps(graph), invoke=0, mode="generate",
                      capture_cap=12 * row_bytes)
    st = RequestState(payload, ParsedGraphs(for_model_type("llama"), torch.float32, 64))
    (action,) = st.plan[("model.layers.0", "output")]   # the fast path serves the capture
    prompt = RowSpan(req_index=0, req_id="r", start=0, stop=10, first_pos=0, prompt_len=10)
    st.add_capture(action, prompt, list(range(10)), torch.randn(10, 64))
    step1 = RowSpan(req_index=0, req_id="r", start=0, stop=1, first_pos=10, prompt_len=10)
    st.add_capture(action, step1, [0], torch.randn(1, 64))
    # preempted: the prompt and the first generated token run again, then step 2
    again = RowSpan(req_index=0, req_id="r", start=0, stop=12, first_pos=0, prompt_len=10)
    st.add_capture(action, again, list(range(12)), torch.randn(12, 64))
    assert st.captured_bytes == 12 * row_bytes
    assert not st.failed, st.outcome.error


def _hooks(requests: dict):
    """The worker's request bookkeeping (``_Hooks._state``) over a fake model runner."""
    from types import SimpleNamespace as NS

    from vinterp_vllm.worker import _Hooks

    h = _Hooks.__new__(_Hooks)
    h.runner = NS(requests=requests)
    h.by_req, h.req_seen, h.by_key = {}, {}, {}
    h.graphs = ParsedGraphs(for_model_type("llama"), torch.float32, 64)
    return h


def _request(key: str | None):
    """A model runner's request object: a payload under ``key``, or a plain request."""
    from types import SimpleNamespace as NS

    graph, _ = capture_graph([[3, 4, 5]], ["model.layers.0"])
    extra = None if key is None else Payload(key=key, graph_json=dumps(graph)).to_extra_args()
    return NS(sampling_params=NS(extra_args=extra))


def test_a_request_id_that_comes_back_is_a_new_request() -> None:
    """vLLM lets an aborted request's id come back as a new request (with
    VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1 the caller's own ids are used). The worker's
    id cache handed the old request's state to it: a plain request was steered and captured
    with someone else's payload, or a payload request ran with none."""
    requests = {"r": _request("a")}
    h = _hooks(requests)
    a = h._state("r")
    assert a is not None and a.payload.key == "a" and h._state("r") is a   # cached
    requests["r"] = _request(None)        # the same id, now a plain request
    assert h._state("r") is None
    requests["r"] = _request("b")         # and now another payload's
    b = h._state("r")
    assert b is not None and b.payload.key == "b" and not b.failed
    assert h.by_key["a"] is a and not a.failed   # the old outcome is still there to drain
    requests["r"] = _request("b")         # a key reused before it was drained
    assert h._state("r") is b
    assert "a key reused before its outcome was drained" in b.outcome.error
    assert "(key 'b')" in b.outcome.error


class _Rows:
    """One request's rows at a point, as the worker hands them to the general runner."""

    def __init__(self, module: str, rows: torch.Tensor, step: int) -> None:
        self.module, self.kind, self.step, self.rows = module, "output", step, rows

    def get(self, invoke: int) -> torch.Tensor:
        return self.rows

    def set(self, invoke: int, value: torch.Tensor) -> None:
        self.rows = value

    def row_positions(self, invoke: int) -> torch.Tensor:
        return torch.arange(self.rows.shape[-2]).unsqueeze(0)

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        return torch.tensor([[3]])


def test_general_saves_count_against_the_cap_step_by_step() -> None:
    """A general-path graph (``x * 2``, not a fast-path capture) saving every step fails as
    soon as its saves pass the cap, and lets them go; they were charged only when the request
    was drained, so a long generation held worker (GPU) memory without bound."""
    from vinterp.ir import Graph, Invoke, Node, Ref, Steps

    steps = Steps(start=0, stop=None)
    graph = Graph(mode="generate", invokes=(Invoke(prompts=((3, 4, 5),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"},
             steps=steps),
        Node(id=1, op="mul", args=(Ref(ref=0), 2.0), steps=steps),
        Node(id=2, op="save", args=(Ref(ref=1),), steps=steps)))
    row_bytes = 64 * 4
    payload = Payload(key="k", graph_json=dumps(graph), invoke=0, mode="generate",
                      capture_cap=9 * row_bytes)   # the prompt's 3 rows, then 6 steps of one
    st = RequestState(payload, ParsedGraphs(for_model_type("llama"), torch.float32, 64))
    assert st.plan is None and st.runner is not None     # the general path runs it
    prompt = RowSpan(req_index=0, req_id="r", start=0, stop=3, first_pos=0, prompt_len=3)
    spans = [prompt] + [RowSpan(req_index=0, req_id="r", start=0, stop=1, first_pos=2 + s,
                                prompt_len=3) for s in range(1, 10)]
    for step, span in enumerate(spans):
        if not st.begin(span):
            break
        st.runner.on_event(_Rows("model.layers.0", torch.randn(1, span.n, 64), step))
        st.end()
        if st.failed:
            break
    assert step == 7 and st.failed and st.outcome.too_large, (step, st.outcome.error)
    assert "exceeded this request's cap" in st.outcome.error
    assert st.runner is None                             # its saves are let go at once
