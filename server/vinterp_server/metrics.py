"""vinterp's Prometheus metrics, next to vLLM's own ``vllm:*`` ones in the same registry.

vLLM's engine records requests running/waiting, tokens, time to first token and inter-token
latency histograms (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``...);
these add what only vinterp knows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

INTERVENTIONS = Counter("vinterp_interventions", "Interventions requested, by op "
                        "(one per layer they apply at)", ["op"])
CAPTURE_BYTES = Counter("vinterp_capture_bytes", "Bytes of captures returned or stored")
TRACES = Counter("vinterp_traces", "Remote traces run, by outcome", ["status"])
REQUESTS = Counter("vinterp_requests", "OpenAI requests, by endpoint and whether they "
                   "carried interventions", ["endpoint", "intervened"])
RETRIES = Counter("vinterp_replica_retries", "Attempts to send a request again, to another "
                  "engine replica, because the last one's engine had died before any output "
                  "was sent (Ray Serve)")


#: the content type of the text :func:`render`, :func:`families` and :func:`merge_replicas`
#: return
CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    """This process's registry in Prometheus' text format."""
    return generate_latest()


def families(prefix: str) -> bytes:
    """This process's families named ``prefix...`` (``vllm:``: an engine replica's;
    ``vinterp_``: an ingress replica's)."""
    text = generate_latest().decode()
    keep = [f for f in text_string_to_metric_families(text) if f.name.startswith(prefix)]
    return _render(keep)


def merge_replicas(texts: Mapping[str, bytes], label: str = "replica") -> bytes:
    """Several replicas' expositions (by replica id) as one, each sample labelled with its
    replica's id (the same family from two registries may not appear twice in one
    exposition; a stable id keeps each series the same from one scrape to the next)."""
    merged: dict[str, Metric] = {}
    for rid, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            into.samples += [s._replace(labels={**s.labels, label: rid})
                             for s in family.samples]
    return _render(list(merged.values()))


def _render(families: list[Metric]) -> bytes:
    class Fixed:
        def collect(self) -> Iterator[Metric]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return generate_latest(registry)
