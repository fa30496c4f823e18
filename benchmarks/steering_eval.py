"""The ``steering_eval`` workload: a layer x scale steering sweep as one batch vs cell by cell.

Both runs use the same vllm-backend ``LanguageModel`` and the same steered generations
(greedy, ``--tokens`` new tokens from each of ``--prompts`` neutral prompts, steered at one
layer with one scale per cell): ``one batch`` is a single ``generate`` trace with an invoke per
(cell, prompt), as ``vinterp.evals.sweep`` submits it; ``cell by cell`` is a loop with one
trace per cell (the prompts of a cell batched), as people loop today. Reports wall time and
generated tokens/s, and checks both runs produced the same tokens.

Usage::

    .venv/bin/python -m benchmarks.steering_eval --layers 10 --scales 9 --prompts 50 --tokens 32
    .venv/bin/python -m benchmarks.steering_eval --layers 2 --scales 3 --prompts 8 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _cells(n_layers: int, n_scales: int, num_hidden: int) -> list[tuple[int, float]]:
    step = max(1, num_hidden // (n_layers + 1))
    layers = [step * (i + 1) for i in range(n_layers)]
    scales = [-1.5 + 3.0 * i / max(1, n_scales - 1) for i in range(n_scales)]
    return [(la, s) for la in layers for s in scales]


def _run(model, vec, cells, prompts, tokens, per_cell: bool) -> tuple[float, list[list[int]]]:
    groups = [[c] for c in cells] if per_cell else [cells]
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for group in groups:
        with model.generate(max_new_tokens=tokens, do_sample=False, ignore_eos=True) as tr:
            for layer, scale in group:
                for p in prompts:
                    with tr.invoke(p):
                        with tr.all():
                            model.layers[layer].output.steer(vec, scale=scale)
        out += [r.tolist() for r in tr.result]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--scales", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from vinterp import LanguageModel
    from vinterp.steering.datasets import neutral_prompts

    model = LanguageModel(args.model, backend="vllm", max_model_len=512)
    prompts = (neutral_prompts() * 10)[:args.prompts]
    cells = _cells(args.layers, args.scales, model.config.num_hidden_layers)
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm() * 20
    _run(model, vec, cells[:1], prompts[:2], 2, per_cell=False)          # warm-up
    gen = len(cells) * len(prompts) * args.tokens
    res = {"workload": "steering_eval", "model": args.model, "cells": len(cells),
           "prompts": len(prompts), "tokens": args.tokens, "generations":
           len(cells) * len(prompts), "generated_tokens": gen}
    t_batch, ids_batch = _run(model, vec, cells, prompts, args.tokens, per_cell=False)
    t_loop, ids_loop = _run(model, vec, cells, prompts, args.tokens, per_cell=True)
    res.update(one_batch_s=round(t_batch, 2), one_batch_tok_s=round(gen / t_batch, 1),
               cell_by_cell_s=round(t_loop, 2), cell_by_cell_tok_s=round(gen / t_loop, 1),
               speedup=round(t_loop / t_batch, 2), same_tokens=ids_batch == ids_loop)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
