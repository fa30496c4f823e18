"""Generation arguments → vLLM ``SamplingParams``, accepting HF and vLLM names.

A trace means what it means on the HF backend: ``do_sample=True`` samples as HF ``generate``
does, from the model's ``generation_config.json`` merged over HF's global defaults (``top_k=50``
among them), not from vLLM's (the whole vocabulary). :func:`hf_sampling_defaults` reads those
once per engine; :func:`sampling_params` fills what a trace leaves unset from them.

Example::

    >>> params = sampling_params({"max_new_tokens": 8, "do_sample": False})
    >>> (params.max_tokens, params.temperature)
    (8, 0.0)
    >>> sampling_params({"do_sample": True}, defaults={"top_k": 50}).top_k
    50
"""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import Mapping
from typing import Any

from vllm import SamplingParams

#: HF ``generate`` names → vLLM names
_HF_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "num_return_sequences": "n"}
#: HF names that vLLM has no use for (harmless here)
_IGNORED = frozenset({"pad_token_id", "use_cache", "num_beams"})


#: HF sampling fields vLLM has under the same name and meaning. The rest of HF's sampling
#: (typical_p, no_repeat_ngram_size, ...) has no vLLM counterpart and is refused when a trace
#: passes it (unknown argument)
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def hf_sampling_defaults(model_path: pathlib.Path | str) -> dict[str, Any]:
    """What HF ``generate`` samples with when a call leaves it unset: the model's
    ``generation_config.json`` over HF's global defaults, as ``_prepare_generation_config``
    merges them. Only the fields :func:`sampling_params` fills.

    Example::

        >>> hf_sampling_defaults(resolve_model("smollm2-135m"))  # doctest: +SKIP
        {'temperature': 1.0, 'top_k': 50, 'top_p': 1.0, 'repetition_penalty': 1.0}
    """
    from transformers import GenerationConfig

    path = pathlib.Path(model_path)
    try:
        merged = GenerationConfig.from_pretrained(path).to_dict()
    except OSError:   # no generation_config.json: HF builds one from config.json's ids only
        merged = {}
    # HF's fallbacks for unset fields (top_k=50, ...), from HF itself where it says them
    fallback = getattr(GenerationConfig, "_get_default_generation_params", None)
    base = fallback() if callable(fallback) else {
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
    out = {}
    for name in _SAMPLING_FIELDS:
        value = merged.get(name)
        value = base.get(name) if value is None else value
        if value is not None:
            out[name] = value
    return out


def _vllm_names() -> set[str]:
    fields = getattr(SamplingParams, "__struct_fields__", None)
    if fields:
        return set(fields)
    return set(inspect.signature(SamplingParams).parameters)


def sampling_params(generation: dict[str, Any], *, mode: str = "generate",
                    extra_args: dict[str, Any] | None = None,
                    defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """Translate ``generation`` (HF or vLLM names) into ``SamplingParams``.

    ``mode="trace"`` is one forward over the prompt: one greedy token. HF's default is greedy
    unless ``do_sample=True``. ``defaults`` (:func:`hf_sampling_defaults`) fill the sampling
    fields a sampled generation leaves unset, and ``repetition_penalty`` always (HF applies it
    to greedy decoding too).
    """
    kw: dict[str, Any] = {}
    if mode == "trace":
        kw.update(max_tokens=1, temperature=0.0)
    else:
        known = _vllm_names()
        gen = dict(generation)
        do_sample = gen.pop("do_sample", None)
        eos = gen.pop("eos_token_id", None)
        if eos is not None and not gen.get("ignore_eos"):
            # HF's eos_token_id replaces the model's EOS: stop on these ids instead
            ids = [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
            gen["stop_token_ids"] = list(gen.get("stop_token_ids") or []) + ids
            gen["ignore_eos"] = True
        if gen.get("num_beams", 1) not in (1, None):
            raise ValueError("beam search (num_beams > 1) is not supported on the vllm backend")
        for many in ("num_return_sequences", "n", "best_of"):
            if gen.get(many, 1) not in (1, None):
                # each sequence would need its own rows in the graph's values; only the
                # first came back, silently
                raise ValueError(
                    f"{many}={gen[many]} is not supported on the vllm backend (a trace's "
                    f"values have one row per prompt); repeat the prompt in more invokes, or "
                    f"pass it several times in one invoke's list, with do_sample=True")
        for name, value in gen.items():
            if name in _IGNORED:
                continue
            target = _HF_NAMES.get(name, name)
            if target not in known:
                raise ValueError(f"unknown generation argument {name!r}; use HF generate names "
                                 f"(max_new_tokens, do_sample, temperature, top_p, top_k, seed) "
                                 f"or vLLM SamplingParams names")
            kw[target] = value
        defaults = defaults or {}
        if do_sample is False or (do_sample is None and "temperature" not in kw):
            kw["temperature"] = 0.0     # greedy, as HF's default
        elif kw.get("temperature") != 0:
            # sampled: what HF would sample with, not vLLM's whole-vocabulary defaults
            for name in ("temperature", "top_k", "top_p", "min_p"):
                if name not in kw and name in defaults:
                    kw[name] = defaults[name]
            kw.setdefault("temperature", 1.0)
        if "repetition_penalty" not in kw and "repetition_penalty" in defaults:
            kw["repetition_penalty"] = defaults["repetition_penalty"]
        kw.setdefault("max_tokens", 20)  # HF's default max_length budget, roughly
    if extra_args is not None:
        kw["extra_args"] = extra_args
    return SamplingParams(**kw)
