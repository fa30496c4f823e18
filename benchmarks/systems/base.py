"""The interface every benchmarked system implements inside its worker process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from benchmarks.workloads import WorkloadConfig


class NotAvailable(Exception):
    """A system (or one of its tasks) cannot run here; the message is recorded as the reason."""


@dataclass(frozen=True)
class Task:
    """One measured unit: a workload case as one system runs it.

    ``variant`` distinguishes ways of running the same case on one system (nnsight's seed loop
    vs invokes, one request at a time vs batched). ``metric`` is ``"tokens_per_s"`` (higher is
    better; tokens / seconds) or ``"seconds"`` (wall time per run, lower is better).
    """

    workload: str
    case: str
    variant: str = "batched"
    metric: str = "tokens_per_s"

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.case}/{self.variant}"


class Timer:
    """Wall-clock timer (``time.perf_counter``) used as ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        _sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.start


def _sync() -> None:
    """Wait for queued GPU work, so a timer around CUDA code measures the work, not its launch."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class System:
    """Base class: load the model once in ``setup``, then run tasks on request.

    ``run`` returns ``{"seconds": float, "tokens": int | None, "items": int}``: ``tokens`` are
    the generated (or, for prefill/capture, prompt) tokens that the throughput divides by;
    ``items`` the number of requests/prompts/calls the time covers (per-item time in reports).
    """

    name = "base"
    cfg: WorkloadConfig  # set by ``setup``; every handler reads its inputs from it

    def setup(self, cfg: WorkloadConfig) -> dict[str, Any]:
        """Load the model; return info recorded in the results (versions, dtype, load time)."""
        raise NotImplementedError

    def tasks(self) -> list[Task]:
        """The tasks this system runs (after ``setup``)."""
        raise NotImplementedError

    def skipped(self) -> dict[str, str]:
        """Workloads or task keys this system would run but cannot here, with the reason."""
        return {}

    def run(self, task: Task) -> dict[str, Any]:
        """Run one task: dispatched to ``run_<workload>(task)``, which each system defines for
        the workloads it takes part in."""
        handler = getattr(self, f"run_{task.workload}", None)
        if handler is None:
            raise ValueError(f"{self.name} has no handler for {task.key}")
        return handler(task)

    def warm(self, task: Task, cfg: WorkloadConfig) -> None:
        """Run ``task`` once on the small inputs of ``cfg``, untimed: lazy initialisation and
        first-call costs (imports, kernel selection, nnsight's source compilation) land here,
        not in the timed repetitions, at a fraction of a full-size run's cost."""
        full = self.cfg
        self.cfg = cfg
        try:
            self.run(task)
        finally:
            self.cfg = full

    @staticmethod
    def levels(cfg: WorkloadConfig) -> list[Task]:
        """The concurrency sweep's tasks (cases ``c1``, ``c4``, ...); see ``concurrency_n``."""
        return [Task("concurrency", f"c{n}") for n in cfg.sizes.concurrency_levels]

    @staticmethod
    def concurrency_n(task: Task) -> int:
        """Requests in flight for a concurrency task (``"c16"`` -> 16)."""
        return int(task.case[1:])
