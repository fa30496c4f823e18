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

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vinterp.backends.base import Backend
from vinterp.models.architectures import Architecture, for_model_type
from vinterp.models.registry import resolve_model
from vinterp.tracing.envoy import Envoy, layer_index
from vinterp.tracing.errors import TracingError
from vinterp.tracing.proxy import Proxy, StepValue
from vinterp.tracing.tracer import Tracer


class LanguageModel:
    """A causal LM whose insides can be read and changed with ``trace`` / ``generate``.

    ``name_or_path``: a vinterp model name (``vinterp models list``), a local HF directory, or
    an already loaded HF model object (used as it is, on its device and dtype; pass
    ``tokenizer=`` unless its ``name_or_path`` is a directory holding one). ``model._model`` is
    the underlying HF model.
    ``backend``: ``"hf"`` (hooks; gradients and attention probabilities), ``"vllm"``
    (continuous batching; see the plugin) or ``"remote"`` (no weights here: the module tree
    on the meta device, every trace sent to a vinterp server; ``host=``, ``api_key=``,
    ``timeout=`` or ``VINTERP_HOST``/``VINTERP_API_KEY``). Other keyword arguments go to the backend
    (``device_map``/``dtype`` and any other ``from_pretrained`` argument for HF; engine
    arguments for vLLM).

    nnsight's arguments: ``torch_dtype=`` is ``dtype=``; ``dispatch=`` is accepted and does
    nothing (vinterp always loads the weights here); ``rename={"model.layers": "blocks"}``
    gives modules extra names (keys: module paths, last names such as ``"self_attn"``,
    ``*`` for one path component, or module classes; values: a name or list of names),
    resolved while tracing, so graphs hold the real paths. On vllm, ``device_map`` is
    ignored with a warning (vLLM places the model itself) unless it is ``"auto"``.
    """

    def __init__(self, name_or_path: str | os.PathLike[str] | nn.Module, backend: str = "hf",
                 *, device_map: str | dict[str, Any] | None = None,
                 dtype: str | torch.dtype | None = None,
                 rename: dict[Any, str | list[str]] | None = None,
                 tokenizer: Any = None,
                 **backend_kwargs: Any) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        backend_kwargs.pop("dispatch", None)   # nnsight: load now; vinterp always does
        if "torch_dtype" in backend_kwargs:
            torch_dtype = backend_kwargs.pop("torch_dtype")
            if dtype is not None and torch_dtype != dtype:
                raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; "
                                 "pass one (torch_dtype is the older name of dtype)")
            dtype = torch_dtype
        #: persistent edits (model.edit()): recorded graphs every trace of this model runs
        self._edits: list[Any] = []
        from transformers import AutoConfig, AutoTokenizer

        loaded = name_or_path if isinstance(name_or_path, nn.Module) else None
        #: built from a loaded model object (scan copies it to the meta device)
        self._from_object = loaded is not None
        if loaded is not None:
            # an already loaded HF model, used as it is (its device and dtype)
            if backend != "hf":
                raise ValueError(f"a loaded model runs on backend='hf' only, not {backend!r}; "
                                 "pass its name or directory for other backends")
            if device_map is not None or dtype is not None or backend_kwargs:
                raise TypeError("device_map=, dtype= and loading arguments apply to a name or "
                                "directory; a loaded model is used as it is")
            self.config = loaded.config
            self.path = Path(str(getattr(self.config, "_name_or_path", "") or
                                 type(loaded).__name__))
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.path)
                except Exception as e:
                    raise ValueError("LanguageModel(model) needs tokenizer=... (none found at "
                                     f"{str(self.path)!r})") from e
            self.tokenizer = tokenizer
        else:
            self.path = resolve_model(str(name_or_path))
            self.config = AutoConfig.from_pretrained(self.path)
            self.tokenizer = tokenizer if tokenizer is not None else \
                AutoTokenizer.from_pretrained(self.path)
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
        if loaded is not None:
            self._model = loaded
            self._backend = self._make_hf_backend(self._model)
        elif backend == "hf":
            self._model = self._load_hf(device_map, dtype, backend_kwargs)
            self._backend = self._make_hf_backend(self._model)
        elif backend == "vllm":
            from vinterp.backends.vllm import VllmBackend

            if device_map not in (None, "auto"):
                warnings.warn(f"device_map={device_map!r} is ignored on the vllm backend: vLLM "
                              "places the model itself (model.device names where)",
                              stacklevel=2)
            self._model = self._meta_model()
            dtype_name = str(dtype).replace("torch.", "") if dtype is not None else None
            self._backend = VllmBackend(self.path, dtype=dtype_name, **backend_kwargs)
        elif backend == "remote":
            from vinterp.backends.remote import RemoteBackend

            # the module tree without weights: every trace runs on the server
            self._model = self._meta_model()
            self._backend = RemoteBackend(backend_kwargs.pop("host", None), **backend_kwargs)
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'hf', 'vllm' or 'remote'")
        self._rename = _check_rename(self._model, rename or {})
        self._configure_tokenizer()
        self._ran_modules: set[str] | None = None

    def _configure_tokenizer(self) -> None:
        """As nnsight does: pad with EOS where the tokenizer has no pad token, and pad on the
        left for a decoder (the right for an encoder), so ``model.tokenizer(prompts,
        padding=True)`` builds the layout a batch runs in and positions the caller reads off
        its attention mask index the same tokens."""
        from vinterp.backends.hf.backend import attends_both_ways

        tok = self.tokenizer
        if getattr(tok, "pad_token", "") is None and getattr(tok, "eos_token", None):
            tok.pad_token = tok.eos_token
        self._pads_right = attends_both_ways(self._model)
        if hasattr(tok, "padding_side"):
            tok.padding_side = "right" if self._pads_right else "left"

    # ------------------------------------------------------------------ loading
    def _load_hf(self, device_map: Any, dtype: Any, extra: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {**extra, "dtype": dtype if dtype is not None else "auto"}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        return model.eval()

    def _meta_model(self) -> nn.Module:
        from vinterp.models.meta import meta_model

        model = meta_copy(self._model) if self._from_object else meta_model(self.config)
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
        On the vllm backend (and remotely), sampling arguments (``temperature``, ``top_p``,
        ``max_tokens``...; nnsight's vLLM traces) make it a generation of ``max_tokens``
        tokens (1 by default); on hf they belong to :meth:`generate`. nnsight's
        ``scan=`` and ``validate=`` are accepted: shapes are always resolved at trace time.
        """
        backend = self._remote(remote, kwargs)
        kwargs.pop("scan", None)
        kwargs.pop("validate", None)
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING}
        if kwargs:
            raise TypeError(f"trace() got unexpected arguments {sorted(kwargs)}")
        if sampling and self.backend_name != "vllm" and backend is None:
            raise TypeError(f"trace() got {sorted(sampling)}: on the hf backend, sampling "
                            "arguments belong to model.generate(...) (vllm traces take them, "
                            "as in nnsight's vLLM traces)")
        if sampling:
            if not any(k in sampling for k in ("max_new_tokens", "max_tokens")):
                sampling["max_new_tokens"] = 1   # a trace is one forward
            return Tracer(self, "generate", inputs, generation=sampling, remote=backend)
        return Tracer(self, "trace", inputs, remote=backend)

    def generate(self, inputs: Any = None, *, remote: bool | str = False, **generation: Any
                 ) -> Tracer:
        """Record interventions on generation; ``tracer.result`` holds the token ids after.

        ``remote=`` as for :meth:`trace`."""
        backend = self._remote(remote, generation)
        generation.pop("scan", None)
        generation.pop("validate", None)
        return Tracer(self, "generate", inputs, generation=generation, remote=backend)

    def edit(self, inputs: Any = None, *, inplace: bool = False) -> Any:
        """nnsight's persistent edits: what the block records runs in every later trace.

        Example::

            with model.edit() as edited:                    # a new model sharing weights
                model.layers[0].output[:] = 0
            with edited.trace("Hello"):                     # runs with layer 0 zeroed
                h = model.layers[1].output.save()           # (either name works inside)
            with model.edit(inplace=True):                  # edit `model` itself
                model.layers[0].mlp.output[:] *= 2
            model.clear_edits()

        Edits apply to every invoke, at every generation step, before the trace's own code.
        """
        from vinterp.tracing.edit import EditTracer

        return EditTracer(self, inputs, inplace=inplace)

    def clear_edits(self) -> None:
        """Drop the persistent edits of :meth:`edit` (``inplace=True``)."""
        self._edits = []

    @contextlib.contextmanager
    def session(self, *args: Any, remote: bool | str = False, **kwargs: Any
                ) -> Iterator[LanguageModel]:
        """nnsight's ``model.session()``: several traces whose saved values feed each other.

        Locally each trace runs when its block ends, so a value saved in one can be used (as
        itself) in the next. Remotely (``remote=True``, or ``backend="remote"``) the traces
        run when the session ends, all in one request: saved values of earlier traces used
        in later ones are filled in on the server, and every saved value holds its value
        after the session block. Unlike nnsight, values must be saved to cross traces.

        Example::

            >>> with model.session(remote=True):                       # doctest: +SKIP
            ...     with model.trace("The Eiffel Tower is in"):
            ...         clean = model.layers[8].output.save()
            ...     with model.trace("The Colosseum is in"):
            ...         model.layers[8].output[:] = clean
            ...         logits = model.logits.save()
        """
        from vinterp.tracing.session import RemoteSession

        backend = self._remote(remote, kwargs)
        if kwargs:
            raise TypeError(f"session() got unexpected arguments {sorted(kwargs)}")
        if backend is None:
            yield self
            return
        if not backend.blocking:
            raise TypeError("model.session(remote=True) runs as one blocking request; "
                            "blocking=False is for single traces")
        if self.__dict__.get("_session") is not None:
            raise TracingError("a remote session is already open; end it before starting "
                               "another")
        session = RemoteSession(backend)
        self._session = session
        try:
            yield self
        finally:
            self._session = None
        session.run()

    def _remote(self, remote: bool | str, kwargs: dict[str, Any]) -> Backend | None:
        """The server backend for ``remote=`` (its options are taken out of ``kwargs``);
        on ``backend="remote"`` every trace is remote."""
        session = self.__dict__.get("_session")
        if session is not None:   # every trace of a remote session goes with the session
            for k in ("api_key", "timeout", "blocking"):
                kwargs.pop(k, None)
            return session.backend
        opts = {k: kwargs.pop(k) for k in ("api_key", "timeout", "blocking") if k in kwargs}
        if not remote and self.backend_name == "remote":
            from vinterp.backends.remote import RemoteBackend

            base: Any = self._backend
            return RemoteBackend(base.url, **{"api_key": base.api_key,
                                              "timeout": base.timeout, **opts})
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
    def device(self) -> torch.device:
        """Where the model runs (on vllm: the engine's device, not the meta copy here)."""
        if self.backend_name == "vllm":
            return self._backend.device  # type: ignore[attr-defined,no-any-return]
        return next(self._model.parameters()).device

    @property
    def _root(self) -> Envoy:
        return Envoy(self, "", self._model)

    @property
    def output(self) -> Proxy:
        """The model's HF output (``.logits``, ...) inside a trace; assigning it replaces the
        output (nnsight's root ``model.output = value``)."""
        return self._root.output

    @output.setter
    def output(self, value: Any) -> None:
        self._root.output = value

    @property
    def input(self) -> Proxy:
        """The model's first input inside a trace (as ``module.input``); assigning it
        replaces that input."""
        return self._root.input

    @input.setter
    def input(self, value: Any) -> None:
        self._root.input = value

    @property
    def inputs(self) -> Proxy:
        """``(args, kwargs)`` the model is called with inside a trace; assigning replaces
        them."""
        return self._root.inputs

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._root.inputs = value

    def __setattr__(self, name: str, value: Any) -> None:
        # A module's name (``model.model``, ``net.fc1``, ``model.layers``) set on this object
        # would hide the module from every later trace, which then reads the value instead,
        # silently; the points (output, input, inputs) have setters of their own above.
        model = self.__dict__.get("_model")
        prop = getattr(type(self), name, None)
        if model is not None and not name.startswith("_") and name not in self.__dict__ \
                and (name in model._modules or name in _ALIAS_NAMES) \
                and not (isinstance(prop, property) and prop.fset is not None):
            raise TracingError(
                f"cannot set model.{name}: it names a module of the model, and a value set "
                f"here would hide it from later traces. Inside a trace, assign its value: "
                f"model.{name}.output = ... (or .input / .inputs)")
        super().__setattr__(name, value)

    @property
    def logits(self) -> StepValue:
        """The final logits tensor (the LM head's output, HF's ``[batch, seq, vocab]``;
        ``seq`` is 1 at generated steps on vllm) inside a trace. ``model.logits.output`` is
        the same value (nnsight's vLLM spelling)."""
        proxy = self._alias_envoy("lm_head").output
        return StepValue(proxy._tracer, proxy._id)

    @logits.setter
    def logits(self, value: Any) -> None:
        raise TracingError("assign to model.lm_head.output (hf backend) to replace the logits; "
                           "model.logits is read-only")

    @property
    def samples(self) -> StepValue:
        """The token ids sampled at this generation step, ``[prompts]`` of the invoke
        (nnsight's vLLM ``model.samples``; ``.output`` and ``.item()`` work). Read after
        the generation: save or combine them, they cannot feed an edit.

        Example::

            >>> with model.generate("Hi", max_new_tokens=3) as tracer:  # doctest: +SKIP
            ...     ids = list().save()
            ...     with tracer.all():
            ...         ids.append(model.samples.item())
        """
        return self._current_tracer("model.samples").samples_output()

    @samples.setter
    def samples(self, value: Any) -> None:
        from vinterp.tracing.generated import _NO_SAMPLE_WRITES

        raise TracingError(_NO_SAMPLE_WRITES)

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
        model = self.__dict__.get("_model")
        if name in _ALIAS_NAMES and self.__dict__.get("architecture") is None and \
                model is not None and name not in model._modules:
            # no architecture table: name the model's own path for it
            paths = [p for p, m in model.named_modules() if p and (
                p.rsplit(".", 1)[-1] == name or name == "layers" and isinstance(m, nn.ModuleList))]
            hint = f"; use its module path: {', '.join('model.' + p for p in paths[:3])}" \
                if paths else " (print(model) shows its module tree)"
            raise AttributeError(f"model.{name} needs an architecture table, which this model "
                                 f"({type(model).__name__}) has not{hint}")
        return getattr(self._root, name)

    def __repr__(self) -> str:
        return repr(self._model)

    # ------------------------------------------------------------------ internals
    def _is_layer(self, path: str) -> bool:
        """Whether ``path`` is one of the decoder layers (``model.layers.3``)."""
        arch = self.architecture
        return arch is not None and layer_index(arch.layers, path) is not None

    def _layer_aliases_of(self, path: str) -> dict[str, str]:
        if not self._is_layer(path):
            return {}
        return self.architecture.layer_aliases()  # type: ignore[union-attr]

    def _layer_alias(self, path: str, name: str) -> str | None:
        return self._layer_aliases_of(path).get(name)

    def _renamed(self, path: str, name: str) -> str | None:
        """The module path ``name`` names under ``path`` through ``rename=``, if any."""
        for key, aliases in self._rename.items():
            if name in aliases:
                hit = _rename_target(self._model, path, key)
                if hit is not None:
                    return hit
        return None

    def _backend_has_point(self, module: str, kind: str) -> bool:
        """Whether ``module.kind`` exists in a run: the module runs in a forward (a meta pass
        finds out once) and the backend serves it."""
        if self._ran_modules is None:
            self._ran_modules = self._modules_that_run()
        if module not in self._ran_modules:
            return False
        has = getattr(self._backend, "has_point", None)
        return has is None or bool(has(module, kind))

    def _invoke_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[Any, dict[str, Any]]:
        """``tracer.invoke(...)``'s arguments: (the invoke's input, its generation settings).
        A language model's invoke takes one input (a prompt, a list of prompts, token ids)."""
        if "inputs" in kwargs and not args:
            args = (kwargs.pop("inputs"),)
        if len(args) > 1:
            raise TypeError(
                f"tracer.invoke() takes one input (a prompt, a list of prompts or token ids), "
                f"got {len(args)} positional arguments; put several prompts in a list")
        return (args[0] if args else None), kwargs

    def _cacheable_paths(self, tracer: Tracer) -> list[str] | None:
        """The modules ``tracer.cache()`` caches by default: those that run in a forward and
        have an output point (``None``: not known yet, see ``NNsight``)."""
        return [p for p, _ in self._model.named_modules()
                if self._backend_has_point(p, "output")]

    def _modules_that_run(self) -> set[str]:
        """Paths of the modules a forward calls (found with hooks on the meta model)."""
        def forward(model: nn.Module) -> None:
            model(input_ids=torch.tensor([self._tokenize("Hello world")[0]], device="meta"))

        return self._modules_run_by(forward)

    def _modules_run_by(self, forward: Callable[[nn.Module], Any]) -> set[str]:
        """Paths of the modules ``forward(meta_model)`` calls (hooks on the meta copy: no
        weights run); every module where the meta pass cannot run."""
        model: nn.Module = self._scan_backend().model  # type: ignore[attr-defined]
        ran: set[str] = set()
        handles = [m.register_forward_hook(lambda *a, p=p: ran.add(p))
                   for p, m in model.named_modules()]
        try:
            with torch.no_grad():
                forward(model)
        except Exception:
            ran = {p for p, _ in model.named_modules()}
        finally:
            for h in handles:
                h.remove()
        return ran

    def _is_attention(self, path: str) -> bool:
        arch = self.architecture
        if arch is None or not path.endswith("." + arch.attn):
            return False
        return self._is_layer(path[: -len(arch.attn) - 1])

    def _tokenize(self, inputs: Any) -> tuple[tuple[int, ...], ...]:
        """An input's prompts as token ids."""
        return self._prompts(inputs)[0]

    def _prompts(self, inputs: Any) -> tuple[tuple[tuple[int, ...], ...], TokenInputs]:
        """An input's prompts as token ids, and the model's other per-token inputs each came
        with (a tokenizer output's ``token_type_ids`` of a sentence pair...; ``None`` when no
        prompt has any). The graph carries both (``ir.Invoke.token_inputs``)."""
        fields: TokenInputs = None
        if isinstance(inputs, str):
            return (tuple(self.tokenizer(inputs)["input_ids"]),), None
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.tolist()
        if hasattr(type(inputs), "keys") and "input_ids" in inputs:   # (a proxy answers any name)
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            flat = bool(ids) and isinstance(ids[0], int)   # one prompt: tok(text)
            if mask is not None:
                mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
                if flat:
                    mask = [mask]
                if not self._pads_right and any(_padded_right(row) for row in mask):
                    warnings.warn(
                        "this encoding is padded on the right; vinterp runs each prompt's own "
                        "tokens, and a batch is padded on the left for this model (as "
                        "model.tokenizer pads), so a position read off this attention mask "
                        "indexes a different token. Build it with model.tokenizer(..., "
                        "padding=True), or index from the end (x[:, -1])", stacklevel=4)
            rows = [ids] if flat else ids
            fields = self._token_fields(inputs, rows, mask, flat)
            if mask is not None:
                rows = [[t for t, m in zip(r, mr, strict=True) if m]
                        for r, mr in zip(rows, mask, strict=True)]
            inputs = rows
        if isinstance(inputs, (list, tuple)) and inputs:
            if all(isinstance(x, str) for x in inputs):
                return tuple(tuple(self.tokenizer(x)["input_ids"]) for x in inputs), None
            if all(isinstance(x, int) for x in inputs):
                return (tuple(inputs),), None
            if all(isinstance(x, (list, tuple)) for x in inputs):
                return tuple(tuple(int(t) for t in x) for x in inputs), fields
        raise TracingError(
            f"cannot use {type(inputs).__name__} as model input; pass a string, a list of "
            "strings, token ids (list of ints or a tensor) or a tokenizer output")

    def _token_fields(self, encoding: Any, rows: list[Any], mask: list[Any] | None,
                      flat: bool) -> TokenInputs:
        """A tokenizer output's per-token inputs besides the ids and the mask that the model's
        forward takes (``token_type_ids``, LayoutLM's ``bbox``...), per prompt: each a
        ``{name: values of its real tokens}``, ``None`` where all are 0 (the model's default
        type ids, as for a prompt given as text). ``None``: no prompt has any. Backends that
        take token ids only (vllm) refuse a graph carrying them (``check_graph``)."""
        params = _forward_params(self._model)
        out: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
        for name in encoding.keys():
            if name in _NOT_CARRIED or name not in params:
                continue   # not an input of this model's forward: nothing it could change
            given = [encoding[name]] if flat else list(encoding[name])
            values = [torch.as_tensor(v) for v in given]
            if len(values) != len(rows) or any(
                    v.dim() == 0 or v.shape[0] != len(r) for v, r in zip(values, rows)):
                raise TracingError(
                    f"this encoding's {name} is not one value per token of input_ids (prompts "
                    f"of {[len(r) for r in rows]} tokens); pass model.tokenizer(...)'s output "
                    "as it is")
            for b, row in enumerate(values):
                if mask is not None:
                    row = row[torch.as_tensor(mask[b]).bool()]
                if bool(row.any()):
                    out[b] = {**(out[b] or {}), name: row}
        return None if all(f is None for f in out) else out

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


#: each prompt's other per-token model inputs, by name (one entry per token), ``None`` for a
#: prompt without any; ``None`` as a whole when no prompt has any
TokenInputs = list[dict[str, torch.Tensor] | None] | None

#: tokenizer outputs that are not per-token inputs to carry: the ids and mask are the layout's,
#: positions the backend's own, and labels would be padded with 0 (not -100) into a loss
_NOT_CARRIED = frozenset({"input_ids", "attention_mask", "position_ids", "labels"})


def _forward_params(model: nn.Module) -> set[str]:
    """The names ``model.forward`` takes explicitly (not through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _padded_right(mask_row: list[int]) -> bool:
    """Whether an attention-mask row has padding after a token."""
    return any(a and not b for a, b in zip(mask_row, mask_row[1:]))


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no weights
    are copied): what ``scan`` and trace-time shapes run on."""
    import copy

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


#: the architecture-table names (model.layers, ...)
_ALIAS_NAMES = frozenset({"layers", "embed", "final_norm", "lm_head", "logits"})


#: trace()/invoke() arguments that make a trace a (sampled) generation, as in nnsight's vLLM
_SAMPLING = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_new_tokens", "seed",
    "do_sample", "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
    "min_tokens", "stop", "stop_token_ids",
})


def _rename_target(model: nn.Module, path: str, key: Any) -> str | None:
    """The path ``key`` (a dotted path with ``*`` wildcards, or a module class) names
    relative to ``path`` in ``model``, or ``None``; more than one match is an error."""
    base = model.get_submodule(path) if path else model
    if isinstance(key, type):
        hits = [n for n, m in base.named_children() if isinstance(m, key)]
    else:
        frontier = [("", base)]
        for part in str(key).strip(".").split("."):
            nxt = []
            for rel, mod in frontier:
                kids = mod.named_children() if part == "*" else \
                    [(part, mod._modules[part])] if part in mod._modules else []
                nxt += [(f"{rel}.{n}" if rel else n, m) for n, m in kids]
            frontier = nxt
        hits = [rel for rel, _ in frontier]
    if len(hits) > 1:
        raise ValueError(f"rename key {key!r} matches {len(hits)} modules under "
                         f"{path or 'the model'} ({', '.join(hits)}); an alias names one module")
    if not hits:
        return None
    return f"{path}.{hits[0]}" if path else hits[0]


def _check_rename(model: nn.Module, rename: dict[Any, Any]) -> dict[Any, tuple[str, ...]]:
    """``rename=`` normalized to key -> alias names; every key must name some module."""
    out: dict[Any, tuple[str, ...]] = {}
    paths = [p for p, _ in model.named_modules()]
    for key, aliases in rename.items():
        names = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for alias in names:
            if not isinstance(alias, str) or not alias.isidentifier():
                raise ValueError(f"rename alias {alias!r} for {key!r}: give a plain name "
                                 "(dotted aliases are not supported)")
        if not any(_rename_target(model, p, key) is not None for p in paths):
            raise ValueError(f"rename key {key!r} names no module of this model "
                             "(print(model) shows the module tree)")
        out[key] = names
    return out
