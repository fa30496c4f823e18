"""Benchmarked systems. Each runs in its own worker process (see benchmarks/worker.py).

Modules are imported lazily by name: the nnsight worker runs in .bench-venv, where vllm and
vinterp's dependencies are not installed.
"""

from __future__ import annotations

import importlib

from benchmarks.systems.base import System

# name -> (module, class, extra kwargs). The order is the order of rows in the report.
SYSTEMS: dict[str, tuple[str, str, dict]] = {
    "vllm_eager": ("benchmarks.systems.vllm_plain", "PlainVLLM", {"enforce_eager": True}),
    "vllm_compiled": ("benchmarks.systems.vllm_plain", "PlainVLLM", {"enforce_eager": False}),
    "vinterp_vllm": ("benchmarks.systems.vinterp_sys", "VinterpSystem", {"backend": "vllm"}),
    "vinterp_vllm_eager": ("benchmarks.systems.vinterp_sys", "VinterpSystem",
                           {"backend": "vllm", "enforce_eager": True}),
    # compiled, steering and captures on persistent tables (full CUDA graphs on a GPU)
    "vinterp_vllm_tables": ("benchmarks.systems.vinterp_sys", "VinterpSystem",
                            {"backend": "vllm", "graph_points": "tables"}),
    "vinterp_hf": ("benchmarks.systems.vinterp_sys", "VinterpSystem", {"backend": "hf"}),
    "nnsight": ("benchmarks.systems.nnsight_sys", "NnsightSystem", {}),
    "hf_hooks": ("benchmarks.systems.hf_hooks", "HFHooksSystem", {}),
}

ALL = frozenset({"steer_generate", "concurrency", "capture", "patch_sweep", "many_users",
                 "trace_overhead"})
# Which workloads each system takes part in (the driver starts only the workers it needs).
SYSTEM_WORKLOADS: dict[str, frozenset[str]] = {
    "vllm_eager": frozenset({"steer_generate", "concurrency", "capture", "many_users"}),
    "vllm_compiled": frozenset({"steer_generate", "concurrency", "capture", "many_users"}),
    "vinterp_vllm": ALL - {"trace_overhead"},
    "vinterp_vllm_eager": frozenset({"steer_generate", "concurrency", "capture", "many_users"}),
    "vinterp_vllm_tables": frozenset({"steer_generate", "concurrency", "capture", "many_users"}),
    "vinterp_hf": ALL,
    "nnsight": ALL,
    "hf_hooks": ALL,
}

# Systems that need the separate nnsight venv.
BENCH_VENV_SYSTEMS = frozenset({"nnsight"})
# Plain vLLM must run without our plugin (vllm.general_plugins entry point "vinterp").
PLAIN_VLLM_SYSTEMS = frozenset({"vllm_eager", "vllm_compiled"})


def make_system(name: str) -> System:
    module, cls, kwargs = SYSTEMS[name]
    obj = getattr(importlib.import_module(module), cls)(**kwargs)
    obj.name = name
    return obj
