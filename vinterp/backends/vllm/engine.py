"""Building the vLLM engine the plugin runs in.

Defaults chosen for interventions: in-process engine core (user scripts need no
``if __name__ == "__main__":`` guard), vLLM's compiled mode with the plugin's hooks traced into
the graph (``additional_config={"vinterp": ...}``; on CUDA, piecewise CUDA graphs split at the
plugin's op; ``enforce_eager=True`` still works and gives the same results), the checkpoint's
float32 unless told otherwise (so numbers match the HF backend), an explicit KV cache size, and
the V1 model runner on CUDA.

Example::

    llm = build_engine(resolve_model("tiny-llama"), dtype="float32", max_num_batched_tokens=32)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: set to 1 to make eager mode the default (the test suite's eager pass uses it)
EAGER_ENV = "VINTERP_VLLM_EAGER"
#: default KV cache for the models vinterp ships (plenty for smollm2-135m)
DEFAULT_KV_CACHE_BYTES = 1 * 2**30
#: set to a byte count to change that default (the test suite, which holds many engines in
#: one machine's memory at once, uses 512 MiB); an explicit kv_cache_memory_bytes wins
KV_CACHE_ENV = "VINTERP_KV_CACHE_BYTES"


def default_kv_cache_bytes() -> int:
    """The KV cache an engine gets unless told otherwise (``VINTERP_KV_CACHE_BYTES``, else
    :data:`DEFAULT_KV_CACHE_BYTES`)."""
    return int(os.environ.get(KV_CACHE_ENV) or DEFAULT_KV_CACHE_BYTES)


def model_type(model_path: pathlib.Path) -> str:
    """The HF ``model_type`` of a local checkpoint."""
    return json.loads((pathlib.Path(model_path) / "config.json").read_text())["model_type"]


_MISSING = object()


@contextlib.contextmanager
def hf_classes_untouched(model_path: pathlib.Path) -> Iterator[None]:
    """Undo vLLM's in-place edits of HF's model classes once the engine is built.

    vLLM's Transformers backend (GPT-NeoX here) decorates HF's decoder class *in place* for
    torch.compile: it swaps ``__init__``/``__call__`` and adds a base class. Every HF model of
    that class in the process then breaks (``'GPTNeoXModel' object has no attribute
    'do_not_compile'``), e.g. the ``backend="hf"`` model a user compares against. Restoring
    the classes leaves vLLM's instance calling ``forward`` directly: such a model runs eager
    inside a compiled engine (same results; the plugin's hooks work either way). Wrap any
    other ``vllm.LLM(...)`` built in a process that also uses HF models in it.
    """
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        base = MODEL_MAPPING[type(AutoConfig.from_pretrained(model_path))]
        module = sys.modules[base.__module__]
        classes = [c for c in vars(module).values()
                   if isinstance(c, type) and c.__module__ == module.__name__]
    except Exception:  # an unknown config: nothing of HF's to protect
        classes = []
    saved = {c: (c.__bases__, {a: c.__dict__.get(a, _MISSING) for a in ("__init__", "__call__")})
             for c in classes}
    try:
        yield
    finally:
        for c, (bases, attrs) in saved.items():
            if c.__bases__ != bases:
                c.__bases__ = bases
            for name, value in attrs.items():
                if value is _MISSING:
                    if name in c.__dict__:
                        delattr(c, name)
                elif c.__dict__.get(name) is not value:
                    setattr(c, name, value)


#: why speculative decoding is refused (here, and by the worker for engines built directly)
SPECULATIVE_REFUSED = (
    "speculative decoding (speculative_config) is not supported with vinterp's hooks: a "
    "step's rows of a request would hold draft tokens that vLLM may then reject, and their "
    "activations would be captured and steered as the request's; start the engine without it")


#: why ``enable_prompt_embeds`` is refused (here, and by the worker for engines built directly)
PROMPT_EMBEDS_REFUSED = (
    "enable_prompt_embeds=True is not supported with vinterp's hooks: vLLM then embeds every "
    "token before the model's forward, outside the step the hooks serve, so nothing at "
    "model.embed_tokens (or model.wte) would be read or edited (and a capture there could "
    "return another step's rows); start the engine without enable_prompt_embeds")


#: why data parallelism and micro-batching are refused (here, and by the worker)
DATA_PARALLEL_REFUSED = (
    "data_parallel_size > 1 is not supported with vinterp's hooks: vLLM then splits a step "
    "into micro-batches (and runs dummy batches on idle ranks) that the hooks' row layout "
    "does not follow, so rows could be steered or captured as another request's; use "
    "data_parallel_size=1 and one engine per replica")
MICROBATCHING_REFUSED = (
    "enable_dbo / ubatch_size > 1 (micro-batching) is not supported with vinterp's hooks: "
    "each micro-batch's forward sees only its own rows, while the hooks lay out the step's "
    "rows as one batch, so rows could be steered or captured as another request's; start the "
    "engine without enable_dbo and ubatch_size")


def refused_setting(setting: Callable[[str], Any]) -> str | None:
    """Why an engine with these settings cannot run vinterp's hooks (``None``: it can).
    ``setting(name)``: an engine argument's value, ``None`` when unset; the one rule for
    :func:`engine_kwargs` (the arguments given) and the worker (an engine built directly).

    Example::

        >>> refused_setting({"data_parallel_size": 2}.get) == DATA_PARALLEL_REFUSED
        True
    """
    if setting("enable_prompt_embeds"):
        return PROMPT_EMBEDS_REFUSED
    if int(setting("data_parallel_size") or 1) > 1:
        return DATA_PARALLEL_REFUSED
    if setting("enable_dbo") or int(setting("ubatch_size") or 0) > 1:
        return MICROBATCHING_REFUSED
    return None


def engine_kwargs(model_path: pathlib.Path, *, dtype: str | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """The engine arguments vinterp runs a model with: checked, with vinterp's defaults.

    Shared by the offline ``LLM`` (:func:`build_engine`) and the server's ``AsyncLLM``
    (:class:`~vinterp.backends.vllm.async_engine.AsyncEngine`), so both refuse the same
    settings with the same words.
    """
    from vinterp.models.architectures import for_model_type
    from vinterp_vllm.graph_op import cuda_compilation_config
    from vinterp_vllm.vllm_patches import CONFIG_KEY, GRAPH_POINTS, HOOKS_VERSION
    from vinterp_vllm.worker import WORKER_EXTENSION

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    tp = int(overrides.get("tensor_parallel_size", 1) or 1)
    if tp > 1 or int(overrides.get("pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError("the vllm backend supports tensor_parallel_size=1 and "
                         "pipeline_parallel_size=1 only for now (per-request hooks are not "
                         "sharded yet); use one device per replica")
    if overrides.get("speculative_config"):
        raise ValueError(SPECULATIVE_REFUSED)
    refusal = refused_setting(overrides.get)
    if refusal:
        raise ValueError(refusal)
    mtype = model_type(model_path)
    arch = for_model_type(mtype)
    if arch.vllm is None:
        raise ValueError(f"model type {mtype!r} is not supported on the vllm backend yet (no "
                         f"VllmMapping in vinterp/models/architectures/); use backend='hf'")
    kwargs: dict[str, Any] = dict(
        model=str(model_path), dtype=dtype or "float32",
        worker_extension_cls=WORKER_EXTENSION, seed=0,
    )
    if os.environ.get(EAGER_ENV, "") not in ("", "0"):
        kwargs["enforce_eager"] = True
    if "gpu_memory_utilization" not in overrides:
        kwargs["kv_cache_memory_bytes"] = default_kv_cache_bytes()
    kwargs.update(overrides)
    # the hooks go in when the model loads (before compilation); this key asks for them and
    # keeps vinterp's compiled artifacts apart from plain vLLM's in the compile cache
    extra = dict(kwargs.get("additional_config") or {})
    ours = dict(extra.get(CONFIG_KEY) or {})
    # On CUDA each point the graph calls the op from splits vLLM's piecewise CUDA graphs, so
    # only the residual stream stays in the graph there; steps that need attention or MLP
    # points run eagerly. On CPU the op costs little: every point stays in the graph.
    ours.setdefault("graph_points", "residual" if on_cuda() else "all")
    if ours["graph_points"] not in GRAPH_POINTS:
        raise ValueError(f"additional_config={{'vinterp': {{'graph_points': "
                         f"{ours['graph_points']!r}}}}}: use one of {list(GRAPH_POINTS)}")
    extra[CONFIG_KEY] = {**ours, "hooks": HOOKS_VERSION}
    kwargs["additional_config"] = extra
    if on_cuda():
        allow_shared_gpu(kwargs)
        if not kwargs.get("enforce_eager"):
            kwargs["compilation_config"] = cuda_compilation_config(
                kwargs.get("compilation_config"), ours["graph_points"])
    return kwargs


# vLLM checks at start that gpu_memory_utilization of the whole card is free, even when the KV
# cache is sized in bytes and that fraction is never used. With the default 0.9, a second
# engine on the same GPU (tests, benchmark workers, replicas) is refused; this floor keeps the
# check meaningful (the card must still have room) without reserving the card for one engine.
SIZED_KV_MEMORY_CHECK = 0.05


def allow_shared_gpu(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Let several engines share a CUDA device when each sizes its KV cache in bytes.

    Example::

        >>> allow_shared_gpu({"kv_cache_memory_bytes": 2**30})["gpu_memory_utilization"]
        0.05
    """
    if kwargs.get("kv_cache_memory_bytes") and "gpu_memory_utilization" not in kwargs:
        kwargs["gpu_memory_utilization"] = SIZED_KV_MEMORY_CHECK
    return kwargs


def on_cuda() -> bool:
    """Whether vLLM runs on a CUDA device here (its platform, not only ``torch.cuda``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def build_engine(model_path: pathlib.Path, *, dtype: str | None = None,
                 **overrides: Any) -> Any:
    """A ``vllm.LLM`` with vinterp's worker extension installed and hooked."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kwargs = engine_kwargs(model_path, dtype=dtype, **overrides)
    from vllm import LLM

    with hf_classes_untouched(model_path):
        llm = LLM(**kwargs)
    llm.collective_rpc("vinterp_install", args=(model_type(model_path),))
    return llm
