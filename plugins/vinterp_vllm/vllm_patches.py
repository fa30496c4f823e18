"""The two places the plugin joins vLLM's worker, patched in from the plugin's ``register()``.

* ``Worker.load_model``: right after the weights load — before vLLM compiles or warms the
  model up — the point hooks go in (``graph_op``), so torch.compile traces them into the
  graph. Only engines built with ``additional_config={"vinterp": ...}`` get them (vinterp's
  ``engine_kwargs`` sets it): plain vLLM engines in the same environment stay untouched, and
  that config enters vLLM's compile-cache hash, so a plain engine and a vinterp engine never
  load each other's compiled artifacts.
* ``GPUModelRunner._model_forward`` (also the CPU runner's): runs inside the forward context
  after the inputs are prepared, with this step's ``positions``. It sets the per-step state
  (which rows belong to which request) before the forward and closes it after, and runs the
  step eagerly when it needs a point the compiled graph does not call the op from
  (``graph_points``); after the forward it checks the output rows of requests that edit
  (``finite.OutputWatch``). Dummy, profile and warm-up runs call the model directly: the op
  finds no step open and does nothing.
* ``EngineCore.shutdown``: several engines in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
  a script holding two ``LanguageModel(..., backend="vllm")``, tests) share vLLM's
  process-wide parallel groups, and shutting one down destroyed them for all: the next forward
  of a survivor failed with "pipeline model parallel group is not initialized". The groups
  now go only with the process's last engine.

Example (vLLM calls ``register()`` itself through the ``vllm.general_plugins`` entry point)::

    apply()   # idempotent
"""

from __future__ import annotations

import functools
import gc
import weakref
from typing import Any

#: the ``additional_config`` key that asks for the plugin's hooks (and its value's version)
CONFIG_KEY = "vinterp"
HOOKS_VERSION = 2   # 2: vinterp::slots marks the point reached
#: which hooked points call the op from the compiled graph (``graph_points`` in the config):
#: ``all``, or ``residual`` (embeddings, each layer's output, the final norm). A step that
#: needs any other point runs eagerly, with every hook (see :func:`graph_points`).
#: ``tables``: the residual points run the table op (``tables.py``: no Python in the graph,
#: full CUDA graphs allowed); a step the tables cannot hold runs eagerly.
GRAPH_POINTS = ("all", "residual", "tables")


def graph_points(vllm_config: Any) -> str:
    """The engine's ``graph_points`` setting (``all`` when unset); refuses unknown values.

    Fewer points in the graph means fewer graph pieces on CUDA, where vinterp's op splits
    vLLM's piecewise CUDA graphs at every point it is called from.

    Example::

        >>> class C: additional_config = {"vinterp": {"graph_points": "residual"}}
        >>> graph_points(C())
        'residual'
    """
    extra = getattr(vllm_config, "additional_config", None) or {}
    value = (extra.get(CONFIG_KEY) or {}).get("graph_points", "all")
    if value not in GRAPH_POINTS:
        raise ValueError(f"additional_config['vinterp']['graph_points']={value!r}: use one of "
                         f"{list(GRAPH_POINTS)}")
    return value

_applied = False


def wants_hooks(vllm_config: Any) -> bool:
    """True when the engine was built for vinterp (``additional_config`` names it)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return isinstance(extra, dict) and CONFIG_KEY in extra


def apply() -> None:
    """Patch vLLM's worker and model runner (once per process)."""
    global _applied
    if _applied:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    load_model = Worker.load_model

    @functools.wraps(load_model)
    def load_model_then_hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = load_model(self, *args, **kwargs)
        if wants_hooks(self.vllm_config):
            from vinterp_vllm.worker import attach_hooks

            attach_hooks(self)
        return out

    model_forward = GPUModelRunner._model_forward

    @functools.wraps(model_forward)
    def model_forward_in_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = getattr(self, "_vinterp_hooks", None)
        if hooks is None:
            return model_forward(self, *args, **kwargs)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        hooks.begin_step(positions)
        try:
            if hooks.eager_step:
                _run_eagerly()
                # also the torch.compile'd pieces vLLM calls outside the model's graph (custom
                # ops' native forwards): compiling them mid-run would call other engines'
                # Dynamo hooks, and an eager step should compile nothing
                import torch

                with torch.compiler.set_stance("force_eager"):
                    out = model_forward(self, *args, **kwargs)
            else:
                out = model_forward(self, *args, **kwargs)
            hooks.after_forward(out)
            return out
        finally:
            hooks.end_step()

    Worker.load_model = load_model_then_hook
    GPUModelRunner._model_forward = model_forward_in_step
    _keep_groups_for_live_engines()
    _applied = True


#: the engine cores alive in this process (see ``_keep_groups_for_live_engines``)
_LIVE_CORES: weakref.WeakSet = weakref.WeakSet()


def _keep_groups_for_live_engines() -> None:
    """Make an engine core's shutdown keep vLLM's process-wide parallel groups while another
    engine core of this process still lives (it would fail at its next forward without them).
    """
    from vllm.v1.engine import core

    init, shutdown = core.EngineCore.__init__, core.EngineCore.shutdown

    @functools.wraps(init)
    def init_tracked(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _LIVE_CORES.add(self)

    @functools.wraps(shutdown)
    def shutdown_sharing(self: Any, *args: Any, **kwargs: Any) -> Any:
        _LIVE_CORES.discard(self)
        cleanup = getattr(core, "cleanup_dist_env_and_memory", None)
        if not _LIVE_CORES or cleanup is None:   # (a vLLM without that step keeps its own)
            return shutdown(self, *args, **kwargs)
        core.cleanup_dist_env_and_memory = lambda *a, **k: gc.collect()
        try:
            return shutdown(self, *args, **kwargs)
        finally:
            core.cleanup_dist_env_and_memory = cleanup

    core.EngineCore.__init__ = init_tracked
    core.EngineCore.shutdown = shutdown_sharing


def _run_eagerly() -> None:
    """Make this step's forward bypass the compiled graph (vLLM's ``skip_compiled``, which
    runs the model's own ``forward`` with every Python hook) and CUDA graph replay."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    ctx.skip_compiled = True
    if hasattr(ctx, "cudagraph_runtime_mode"):
        from vllm.config import CUDAGraphMode

        ctx.cudagraph_runtime_mode = CUDAGraphMode.NONE
