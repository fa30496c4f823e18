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
