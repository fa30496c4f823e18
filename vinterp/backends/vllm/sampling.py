"""Generation arguments → vLLM ``SamplingParams``, accepting HF and vLLM names.

Example::

    >>> params = sampling_params({"max_new_tokens": 8, "do_sample": False})
    >>> (params.max_tokens, params.temperature)
    (8, 0.0)
"""

from __future__ import annotations

import inspect
from typing import Any

from vllm import SamplingParams

#: HF ``generate`` names → vLLM names
_HF_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "num_return_sequences": "n"}
#: HF names that vLLM has no use for (harmless here)
_IGNORED = frozenset({"pad_token_id", "use_cache", "num_beams"})


def _vllm_names() -> set[str]:
    fields = getattr(SamplingParams, "__struct_fields__", None)
    if fields:
        return set(fields)
    return set(inspect.signature(SamplingParams).parameters)


def sampling_params(generation: dict[str, Any], *, mode: str = "generate",
                    extra_args: dict[str, Any] | None = None) -> SamplingParams:
    """Translate ``generation`` (HF or vLLM names) into ``SamplingParams``.

    ``mode="trace"`` is one forward over the prompt: one greedy token. HF's default is greedy
    unless ``do_sample=True``.
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
        if do_sample is False or (do_sample is None and "temperature" not in kw):
            kw["temperature"] = 0.0     # greedy, as HF's default
        elif do_sample and "temperature" not in kw:
            kw["temperature"] = 1.0
        kw.setdefault("max_tokens", 20)  # HF's default max_length budget, roughly
    if extra_args is not None:
        kw["extra_args"] = extra_args
    return SamplingParams(**kw)
