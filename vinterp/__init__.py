"""vinterp: an intervention engine for language models.

nnsight-style deferred tracing compiled to a serializable intervention graph, run on Hugging
Face models or inside vLLM's continuous batch.

Example::

    from vinterp import LanguageModel
    model = LanguageModel("smollm2-135m")
    with model.trace("The capital of France is"):
        hidden = model.layers[5].output.save()
"""

from typing import Any

__version__ = "0.1.0"


def save(obj: Any) -> Any:
    """Save every proxy inside ``obj`` (a proxy, or lists/tuples/dicts of them); returns ``obj``.

    Example::

        with model.trace("Hi"):
            outs = vinterp.save([model.layers[i].output for i in range(2)])
    """
    from vinterp.tracing.proxy import Proxy

    if isinstance(obj, Proxy):
        return obj.save()
    if isinstance(obj, list):
        return [save(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(save(x) for x in obj)
    if isinstance(obj, dict):
        return {k: save(v) for k, v in obj.items()}
    return obj


def named_vector(name: str, layer: int | None = None) -> Any:
    """A vector stored on the vinterp server under ``name``, for ``remote=True`` traces.

    Example::

        with model.trace(prompt, remote=True):
            model.layers[8].output.steer(vinterp.named_vector("happy"), scale=4.0)
    """
    from vinterp.backends.remote import NamedVector

    return NamedVector(name, layer)


def __getattr__(name: str) -> Any:
    # Lazy so `import vinterp` (CLI, IR-only clients) does not pay for torch/transformers.
    if name == "LanguageModel":
        from vinterp.language_model import LanguageModel

        return LanguageModel
    if name == "NNsight":
        from vinterp.nnsight_model import NNsight

        return NNsight
    if name == "apply":
        from vinterp.tracing.proxy import apply

        return apply
    raise AttributeError(f"module 'vinterp' has no attribute {name!r}")


__all__ = ["LanguageModel", "NNsight", "apply", "named_vector", "save", "__version__"]
