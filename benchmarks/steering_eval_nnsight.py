"""The nnsight arms of the ``steering_eval`` workload (run on ``.bench-venv/bin/python``).

Standard library, torch and nnsight only (never vinterp or vllm): ``benchmarks.steering_eval``
starts this module in nnsight's own venv with a JSON spec, and reads back a JSON result.

Two ways people run a steering sweep with nnsight 0.8.1, written as nnsight's docs write it
(``model.generate``, ``tracer.invoke``, ``for step in tracer.all():`` to steer every
generation step; the ``with tracer.all():`` block form is deprecated in 0.8.1):

* ``looped``: one ``generate`` per generation, looping over the cells and, inside a cell, over
  its prompts (the repeng / steering-vectors habit: a Python loop around ``generate``);
* ``per_cell``: one ``generate`` per cell with an invoke per prompt (the prompts of a cell
  batched; the cells looped).

Each cell is timed alone, so a subset of the grid's cells gives seconds per cell to
extrapolate from. Example::

    .bench-venv/bin/python -m benchmarks.steering_eval_nnsight spec.json out.json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch


def _steer(model: Any, layer: int, vec: torch.Tensor) -> None:
    """Inside an invoke: add ``vec`` to the layer's output at every step."""
    layers = model.model.layers
    layers[layer].output = layers[layer].output + vec


def _new_ids(model: Any, out: torch.Tensor, prompts: list[str]) -> list[list[int]]:
    """Each row's generated ids (``tracer.result`` is the left-padded batch + new ids)."""
    width = model.tokenizer(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
    return out[:, width:].tolist()


def looped_cell(model: Any, layer: int, vec: torch.Tensor, prompts: list[str],
                tokens: int) -> tuple[float, list[list[int]]]:
    """One cell, one ``generate`` per prompt: (seconds, generated ids per prompt)."""
    new: list[list[int]] = []
    t0 = time.perf_counter()
    for p in prompts:
        with model.generate(max_new_tokens=tokens, min_new_tokens=tokens,
                            do_sample=False) as tr:
            with tr.invoke(p):
                for _step in tr.all():
                    _steer(model, layer, vec)
            with tr.invoke():   # the generated ids (an empty invoke)
                out = tr.result.save()
        new += _new_ids(model, out, [p])
    return time.perf_counter() - t0, new


def per_cell(model: Any, layer: int, vec: torch.Tensor, prompts: list[str],
             tokens: int) -> tuple[float, list[list[int]]]:
    """One cell as one ``generate`` with an invoke per prompt: (seconds, generated ids)."""
    t0 = time.perf_counter()
    with model.generate(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False) as tr:
        for p in prompts:
            with tr.invoke(p):
                for _step in tr.all():
                    _steer(model, layer, vec)
        with tr.invoke():
            out = tr.result.save()
    seconds = time.perf_counter() - t0
    return seconds, _new_ids(model, out, prompts)


ARMS = {"looped": looped_cell, "per_cell": per_cell}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Time each arm on each of ``spec["cells"]``; returns seconds and ids per cell.

    ``spec``: ``model_path``, ``prompts``, ``tokens``, ``vector`` (a ``.pt`` file of one
    ``[hidden]`` tensor), ``cells`` (``[layer, scale]`` pairs) and ``arms``.
    """
    import nnsight
    import transformers
    from nnsight import LanguageModel

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = LanguageModel(spec["model_path"], dtype=torch.float32, dispatch=True)
    base = torch.load(spec["vector"]).float()
    prompts, tokens = list(spec["prompts"]), int(spec["tokens"])
    layer0 = int(spec["cells"][0][0])
    for arm in spec["arms"]:                      # untimed warm-up on tiny inputs
        ARMS[arm](model, layer0, base, prompts[:2], 2)
    out: dict[str, Any] = {"versions": {"nnsight": nnsight.__version__,
                                        "torch": torch.__version__,
                                        "transformers": transformers.__version__},
                           "arms": {}}
    for arm in spec["arms"]:
        rows = []
        for layer, scale in spec["cells"]:
            secs, ids = ARMS[arm](model, int(layer), base * float(scale), prompts, tokens)
            rows.append({"layer": int(layer), "scale": float(scale), "seconds": secs,
                         "new_tokens": [len(x) for x in ids], "ids": ids})
            print(f"nnsight {arm} L{layer} S{scale:+.3f}: {secs:.1f} s", file=sys.stderr,
                  flush=True)
        out["arms"][arm] = rows
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0]).read())
    with open(argv[1], "w") as f:
        json.dump(run(spec), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
