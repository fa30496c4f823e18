"""vinterp's Prometheus metrics, next to vLLM's own ``vllm:*`` ones in the same registry.

vLLM's engine records requests running/waiting, tokens, time to first token and inter-token
latency histograms (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``...);
these add what only vinterp knows.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

INTERVENTIONS = Counter("vinterp_interventions", "Interventions requested, by op "
                        "(one per layer they apply at)", ["op"])
CAPTURE_BYTES = Counter("vinterp_capture_bytes", "Bytes of captures returned or stored")
TRACES = Counter("vinterp_traces", "Remote traces run, by outcome", ["status"])
REQUESTS = Counter("vinterp_requests", "OpenAI requests, by endpoint and whether they "
                   "carried interventions", ["endpoint", "intervened"])


def render() -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
