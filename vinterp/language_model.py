"""``LanguageModel``: the entry point users write nnsight-style code against.

Example::

    from vinterp import LanguageModel
    model = LanguageModel("smollm2-135m")                 # backend="hf" by default
    with model.trace("The Eiffel Tower is in the city of"):
        h = model.model.layers[8].output.save()           # same as model.layers[8].output
        logits = model.output.logits.save()
    print(h.shape, logits[0, -1].argmax())
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vinterp.backends.base import Backend
from vinterp.models.architectures import Architecture, for_model_type
from vinterp.models.registry import resolve_model
from vinterp.tracing.envoy import Envoy, layer_index
from vinterp.tracing.errors import TracingError
from vinterp.tracing.proxy import Proxy
from vinterp.tracing.tracer import Tracer


class LanguageModel:
    """A causal LM whose insides can be read and changed with ``trace`` / ``generate``.

    ``name_or_path``: a vinterp model name (``vinterp models list``) or a local HF directory.
    ``backend``: ``"hf"`` (hooks; gradients and attention probabilities) or ``"vllm"``
    (continuous batching; see the plugin). Other keyword arguments go to the backend
    (``device_map``/``dtype`` for HF; engine arguments for vLLM).
    """

    def __init__(self, name_or_path: str | os.PathLike[str], backend: str = "hf", *,
                 device_map: str | dict[str, Any] | None = None,
                 dtype: str | torch.dtype | None = None, **backend_kwargs: Any) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoTokenizer

        self.path: Path = resolve_model(str(name_or_path))
        self.config = AutoConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        try:
            self.architecture: Architecture | None = for_model_type(self.config.model_type)
        except KeyError:
            self.architecture = None
        self.backend_name = backend
        self._tracers: list[Tracer] = []
        self._meta_backend: Backend | None = None
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self._pad_id = int(pad)
        if backend == "hf":
            self._model = self._load_hf(device_map, dtype)
            self._backend = self._make_hf_backend(self._model)
        elif backend == "vllm":
            from vinterp.backends.vllm import VllmBackend

            self._model = self._meta_model()
            dtype_name = str(dtype).replace("torch.", "") if dtype is not None else None
            self._backend = VllmBackend(self.path, dtype=dtype_name, **backend_kwargs)
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'hf' or 'vllm'")

    # ------------------------------------------------------------------ loading
    def _load_hf(self, device_map: Any, dtype: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        return model.eval()

    def _meta_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        # This check reads token values (impossible on meta tensors) only to print a warning.
        for module in model.modules():
            if hasattr(module, "warn_if_padding_and_no_attention_mask"):
                module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
        return model.eval()

    def _make_hf_backend(self, model: nn.Module, scan: bool = False) -> Backend:
        from vinterp.backends.hf import HfBackend

        return HfBackend(model, self.architecture, self._pad_id, self.tokenizer.eos_token_id,
                         scan=scan)

    def _scan_backend(self) -> Backend:
        if self._meta_backend is None:
            meta = self._model if self.backend_name != "hf" else self._meta_model()
            self._meta_backend = self._make_hf_backend(meta, scan=True)
        return self._meta_backend

    # ------------------------------------------------------------------ tracing API
    def trace(self, inputs: Any = None, *, remote: bool | str = False, **kwargs: Any
              ) -> Tracer:
        """Record interventions on one forward pass over ``inputs`` (or invokes).

        ``remote=True`` runs it on a vinterp server (``VINTERP_HOST``/``VINTERP_API_KEY``, or
        ``remote="http://host:port"``, ``api_key=``, ``timeout=``, ``blocking=False``).
        """
        backend = self._remote(remote, kwargs)
        if kwargs:
            raise TypeError(f"trace() got unexpected arguments {sorted(kwargs)}")
        return Tracer(self, "trace", inputs, remote=backend)

    def generate(self, inputs: Any = None, *, remote: bool | str = False, **generation: Any
                 ) -> Tracer:
        """Record interventions on generation; ``tracer.result`` holds the token ids after.

        ``remote=`` as for :meth:`trace`."""
        backend = self._remote(remote, generation)
        return Tracer(self, "generate", inputs, generation=generation, remote=backend)

    @staticmethod
    def _remote(remote: bool | str, kwargs: dict[str, Any]) -> Backend | None:
        """The server backend for ``remote=`` (its options are taken out of ``kwargs``)."""
        opts = {k: kwargs.pop(k) for k in ("api_key", "timeout", "blocking") if k in kwargs}
        if not remote:
            if opts:
                raise TypeError(f"{sorted(opts)} apply to remote=True traces only")
            return None
        from vinterp.backends.remote import RemoteBackend

        return RemoteBackend(remote if isinstance(remote, str) else None, **opts)

    def scan(self, inputs: Any = None) -> Tracer:
        """Like :meth:`trace` on meta tensors: shapes without running the weights."""
        return Tracer(self, "trace", inputs, scan=True)

    # ------------------------------------------------------------------ module tree
    @property
    def _root(self) -> Envoy:
        return Envoy(self, "", self._model)

    @property
    def output(self) -> Proxy:
        """The model's HF output (``.logits``, ...) inside a trace."""
        return self._root.output

    @property
    def logits(self) -> Proxy:
        """The final logits tensor (the LM head's output) inside a trace."""
        return self._alias_envoy("lm_head").output

    @property
    def layers(self) -> Envoy:
        """The decoder layers (``model.layers[i]``), whatever the architecture calls them."""
        return self._alias_envoy("layers")

    @property
    def embed(self) -> Envoy:
        """The token embedding module."""
        return self._alias_envoy("embed")

    @property
    def final_norm(self) -> Envoy:
        """The norm before the LM head."""
        return self._alias_envoy("final_norm")

    @property
    def lm_head(self) -> Envoy:
        """The LM head."""
        return self._alias_envoy("lm_head")

    def _alias_envoy(self, alias: str) -> Envoy:
        if self.architecture is None:
            raise AttributeError(
                f"model.{alias} needs an architecture table for model_type "
                f"{self.config.model_type!r}; use the HF module path instead (print(model))")
        return self._root._descend(self.architecture.aliases()[alias])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._root, name)

    def __repr__(self) -> str:
        return repr(self._model)

    # ------------------------------------------------------------------ internals
    def _layer_aliases_of(self, path: str) -> dict[str, str]:
        arch = self.architecture
        if arch is None or layer_index(arch.layers, path) is None:
            return {}
        return arch.layer_aliases()

    def _layer_alias(self, path: str, name: str) -> str | None:
        return self._layer_aliases_of(path).get(name)

    def _is_attention(self, path: str) -> bool:
        arch = self.architecture
        if arch is None or not path.endswith("." + arch.attn):
            return False
        return layer_index(arch.layers, path[: -len(arch.attn) - 1]) is not None

    def _tokenize(self, inputs: Any) -> tuple[tuple[int, ...], ...]:
        if isinstance(inputs, str):
            return (tuple(self.tokenizer(inputs)["input_ids"]),)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.tolist()
        if hasattr(inputs, "keys") and "input_ids" in inputs:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            if mask is not None:
                mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
                ids = [[t for t, m in zip(r, mr, strict=True) if m] for r, mr in zip(ids, mask,
                                                                                     strict=True)]
            inputs = ids
        if isinstance(inputs, (list, tuple)) and inputs:
            if all(isinstance(x, str) for x in inputs):
                return tuple(tuple(self.tokenizer(x)["input_ids"]) for x in inputs)
            if all(isinstance(x, int) for x in inputs):
                return (tuple(inputs),)
            if all(isinstance(x, (list, tuple)) for x in inputs):
                return tuple(tuple(int(t) for t in x) for x in inputs)
        raise TracingError(
            f"cannot use {type(inputs).__name__} as model input; pass a string, a list of "
            "strings, token ids (list of ints or a tensor) or a tokenizer output")

    def _push_tracer(self, tracer: Tracer) -> None:
        self._tracers.append(tracer)

    def _pop_tracer(self, tracer: Tracer) -> None:
        if self._tracers and self._tracers[-1] is tracer:
            self._tracers.pop()

    def _current_tracer(self, what: str) -> Tracer:
        if not self._tracers:
            raise TracingError(f"{what} is only available inside `with model.trace(...)` or "
                               "`with model.generate(...)`")
        return self._tracers[-1]
