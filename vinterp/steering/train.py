"""Train a steering vector from contrastive prompts (positive vs negative).

Activations come from one batched capture: a single trace with one invoke per prompt, on any
backend (``hf``, ``vllm``, or ``remote=`` a vinterp server). Three ways to turn them into a
direction per layer:

* ``mean_diff``: mean(positive) - mean(negative) (CAA).
* ``pca``: the first principal direction of the paired differences (repeng's ``pca_diff``;
  uncentered, so a consistent difference is found even with little spread), or of the
  centered union when the two sets are not paired.
* ``logistic``: the weight direction of an L2-regularized logistic regression.

``pca`` and ``logistic`` give a unit direction, scaled to the length of the mean difference
along it, and signed so that positive prompts project higher.

Example::

    vec = train_vector(model, ["I love it"], ["I hate it"], layers=range(8, 20))
    vec.save("happy.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from vinterp.steering.vectors import SteeringVector, prompts_hash

METHODS = ("mean_diff", "pca", "logistic")
POSITIONS = ("last", "mean")


def _check_prompts(name: str, prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of prompts, not one string")
    out = [p for p in prompts]
    if not out:
        raise ValueError(f"no {name} prompts given")
    empty = [i for i, p in enumerate(out) if not str(p).strip()]
    if empty:
        raise ValueError(f"{name} prompt(s) {empty[:5]} are empty")
    return out


def capture(model: Any, prompts: Sequence[str], layers: Sequence[int], position: str = "last",
            **trace_kwargs: Any) -> dict[int, torch.Tensor]:
    """Activations ``{layer: [n_prompts, hidden]}`` at the decoder layers' outputs, from one
    trace with an invoke per prompt. ``trace_kwargs`` go to ``model.trace`` (``remote=``...)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    saved: list[list[Any]] = []
    with model.trace(**trace_kwargs) as tracer:
        for p in prompts:
            with tracer.invoke(p):
                row = []
                for i in layers:
                    h = model.layers[i].output
                    row.append((h[:, -1] if position == "last" else h.mean(1)).save())
                saved.append(row)
    return {layer: torch.cat([torch.as_tensor(r[j]).reshape(1, -1) for r in saved]).float()
            for j, layer in enumerate(layers)}


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if float(n) == 0.0:
        raise ValueError("the positive and negative activations do not differ: zero direction")
    return v / n


def fit_direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff",
                  *, l2: float = 1e-2, steps: int = 200) -> torch.Tensor:
    """One layer's direction from ``pos [n, hidden]`` and ``neg [m, hidden]`` activations."""
    pos, neg = pos.double(), neg.double()
    diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return diff.float()
    if method == "pca":
        if pos.shape[0] == neg.shape[0]:
            x = pos - neg
        else:
            both = torch.cat([pos, neg])
            x = both - both.mean(0)
        u = torch.linalg.svd(x, full_matrices=False).Vh[0]
    elif method == "logistic":
        x = torch.cat([pos, neg])
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
        mu, sd = x.mean(0), x.std() + 1e-12          # one global scale keeps directions
        z = (x - mu) / sd
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
            loss = loss + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        u = w.detach()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    u = _unit(u)
    along = float(diff @ u)
    if along < 0:
        u, along = -u, -along
    return (u * along).float()


def train_vector(model: Any, positive: Sequence[str], negative: Sequence[str],
                 layers: Iterable[int] | None = None, method: str = "mean_diff",
                 position: str = "last", **trace_kwargs: Any) -> SteeringVector:
    """A :class:`SteeringVector` at ``layers`` (default: all) from contrastive prompts.

    ``model``: a ``LanguageModel`` on any backend; ``trace_kwargs`` go to ``model.trace``
    (e.g. ``remote="http://127.0.0.1:8000"``). All prompts run as one batched trace.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    positive = _check_prompts("positive", positive)
    negative = _check_prompts("negative", negative)
    n_layers = int(model.config.num_hidden_layers)
    use = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if not use:
        raise ValueError("no layers given")
    bad = [i for i in use if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    acts = capture(model, positive + negative, use, position, **trace_kwargs)
    n = len(positive)
    vectors = {i: fit_direction(acts[i][:n], acts[i][n:], method) for i in use}
    name = getattr(model, "name", None) or str(getattr(model, "path", "")) or None
    return SteeringVector(vectors, model=_model_name(name), method=method, position=position,
                          prompts_hash=prompts_hash(positive, negative),
                          extra={"n_positive": n, "n_negative": len(negative)})


def _model_name(path: str | None) -> str | None:
    if not path:
        return None
    from pathlib import Path

    return Path(path).name
