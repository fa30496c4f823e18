"""The two places the plugin joins vLLM's worker, patched in from the plugin's ``register()``.

* ``Worker.load_model``: right after the weights load — before vLLM compiles or warms the
  model up — the point hooks go in (``graph_op``), so torch.compile traces them into the
  graph. Only engines built with ``additional_config={"vinterp": ...}`` get them (vinterp's
  ``engine_kwargs`` sets it): plain vLLM engines in the same environment stay untouched, and
  that config enters vLLM's compile-cache hash, so a plain engine and a vinterp engine never
  load each other's compiled artifacts.
* ``GPUModelRunner._model_forward`` (also the CPU runner's): runs inside the forward context
  after the inputs are prepared, with this step's ``positions``. It sets the per-step state
  (which rows belong to which request) before the forward and closes it after. Dummy,
  profile and warm-up runs call the model directly: the op finds no step open and does
  nothing.

Example (vLLM calls ``register()`` itself through the ``vllm.general_plugins`` entry point)::

    apply()   # idempotent
"""

from __future__ import annotations

import functools
from typing import Any

#: the ``additional_config`` key that asks for the plugin's hooks (and its value's version)
CONFIG_KEY = "vinterp"
HOOKS_VERSION = 1

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
            return model_forward(self, *args, **kwargs)
        finally:
            hooks.end_step()

    Worker.load_model = load_model_then_hook
    GPUModelRunner._model_forward = model_forward_in_step
    _applied = True
