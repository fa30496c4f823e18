"""Record nnsight 0.8.1's own values for the compatibility tests (nnsight_reference.json).

Run with the benchmark venv that ``make bench-setup`` creates (nnsight is not a dependency of
vinterp's own venv)::

    .bench-venv/bin/python tests/compat/record_nnsight.py ~/.cache/vinterp/models/tiny-llama

Each entry is one idiom exactly as nnsight's docs write it (see the test files for the URLs);
values are plain lists so the JSON stays small and readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from nnsight import LanguageModel

PROMPT = "The quick brown fox"
N_NEW = 5


def _rows(x: torch.Tensor) -> list:
    return x.detach().float().cpu().tolist()


def main(model_path: str) -> None:
    model = LanguageModel(model_path, dtype=torch.float32, dispatch=True)
    out: dict[str, object] = {"nnsight": __import__("nnsight").__version__, "prompt": PROMPT,
                              "max_new_tokens": N_NEW}

    # iter-all-next.md "Per-step conditional"; _audit.py intermediate_07
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        preds = list().save()
        hidden = list().save()
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(step)
            if step == 2:
                model.model.layers[0].output[:] = 0
            hidden.append(model.model.layers[1].output[0, -1])
            preds.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
        # (nothing after an open loop runs in nnsight: the ids come from the predictions)
    out["iter_conditional"] = {"steps": list(steps), "predictions": [int(p) for p in preds],
                               "last_hidden": [_rows(h) for h in hidden]}

    # iter-all-next.md "Slice" and "List"; _audit.py intermediate_12
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        mid = list().save()
        for step in tracer.iter[1:3]:
            mid.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        picked = list().save()
        for step in tracer.iter[[0, 2, 4]]:
            picked.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    out["iter_slice"] = [int(p) for p in mid]
    out["iter_list"] = [int(p) for p in picked]

    # iter-all-next.md "`tracer.all()` — every step"
    with model.generate(PROMPT, max_new_tokens=3) as tracer:
        hidden_states = list().save()
        for step in tracer.all():
            model.model.layers[0].output[:] = 0
            hidden_states.append(model.model.layers[-1].output[0, -1])
    out["all_zero_every_step"] = [_rows(h) for h in hidden_states]

    # generate.md "Accessing the result"; _audit.py intermediate_03
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        output = tracer.result.save()
    with model.generate(PROMPT, max_new_tokens=N_NEW):
        generated_tokens = model.generator.output.save()
    out["tracer_result"] = _rows(output)
    out["generator_output"] = _rows(generated_tokens)

    # _audit.py intermediate_09: tracer.result in a trace is the model's output
    with model.trace(PROMPT) as tracer:
        trace_result = tracer.result.save()
    out["trace_result_last_logits_argmax"] = int(trace_result.logits[0, -1].argmax())

    record_more(model, out)
    record_with_forms(model, out)

    path = Path(__file__).with_name("nnsight_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def _top(x: torch.Tensor, k: int = 5) -> dict[str, list]:
    top = x.detach().float().topk(k)
    return {"values": top.values.tolist(), "indices": top.indices.tolist()}


def record_more(model: LanguageModel, out: dict[str, object]) -> None:
    """Idioms of issue 13 beyond step loops (see tests/compat/test_idioms.py for sources)."""
    # backward.py (nnsight >= 0.5): `with loss.backward():` around the .grad reads
    with model.trace(PROMPT):
        a1 = model.model.layers[1].output
        loss = model.output.logits.sum()
        with loss.backward():
            g = a1.grad.save()
    out["grad_backward_block"] = _rows(g)

    # the logit lens (nnsight README / tutorials/logit_lens): final norm + LM head per layer
    with model.trace(PROMPT):
        lens = list().save()
        for layer in model.model.layers:
            lens.append(model.lm_head(model.model.norm(layer.output))[0, -1])
    out["logit_lens"] = [_top(x) for x in lens]

    # shapes at trace time: B, S, _ = x.shape; x.view(B, S, H, D) (zero head 0 of layer 0)
    with model.trace(PROMPT):
        dims = list().save()
        x = model.model.layers[0].self_attn.o_proj.input
        B, S, _ = x.shape
        H = model.config.num_attention_heads
        heads = x.view(B, S, H, x.shape[-1] // H).clone()
        heads[:, :, 0] = 0
        model.model.layers[0].self_attn.o_proj.input = heads.view(B, S, -1)
        shaped = model.lm_head.output[0, -1].save()
        dims.extend([B, S, H])
    out["view_heads"] = {"shape": [int(d) for d in dims], "logits": _top(shaped)}

    # tracer.cache() (tracer.py docstring): keyed "model." + path, values under .output
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache()
    out["cache"] = {"keys": sorted(cache.keys()),
                    "layer0_last": _rows(cache["model.model.layers.0"].output[0, -1]),
                    "nav_equal": bool(torch.equal(cache.model.model.layers[0].output,
                                                  cache["model.model.layers.0"].output))}

    # module.skip(value) (envoy.py): layer 1 passes its input through
    with model.trace(PROMPT):
        model.model.layers[1].skip(model.model.layers[1].input)
        skipped = model.lm_head.output[0, -1].save()
    out["skip"] = _top(skipped)

    # model.edit() (envoy.py): a new model with layer 0's output zeroed; inplace + clear_edits
    with model.edit() as (_, edited):
        edited.model.layers[0].output[:] = 0
    with edited.trace(PROMPT):
        e1 = edited.lm_head.output[0, -1].save()
    with model.trace(PROMPT):
        plain = model.lm_head.output[0, -1].save()
    with model.edit(inplace=True):
        model.model.layers[0].output[:] = 0
    with model.trace(PROMPT):
        e2 = model.lm_head.output[0, -1].save()
    model.clear_edits()
    out["edit"] = {"edited": _top(e1), "plain": _top(plain), "inplace": _top(e2)}

    # tracer.barrier(n) (tracer.py docstring), in a trace: invoke 2 gets invoke 1's embeddings
    other = "The lazy grey dog"
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT):
            embeddings = model.model.embed_tokens.output
            barrier()
        with tracer.invoke(other):
            barrier()
            model.model.embed_tokens.output = embeddings
            moved = model.lm_head.output[0, -1].save()
    out["barrier"] = {"other": other, "logits": _top(moved)}

    # the empty invoke (tracer.py invoke docstring): the whole batch
    with model.trace() as tracer:
        with tracer.invoke(PROMPT):
            pass
        with tracer.invoke(other):
            pass
        with tracer.invoke():
            batch = model.model.layers[1].output.save()
    out["empty_invoke"] = {"shape": list(batch.shape), "last": _rows(batch[:, -1])}


def record_with_forms(model: LanguageModel, out: dict[str, object]) -> None:
    """The ``with tracer.all():`` / ``with tracer.iter[...]:`` block forms (deprecated in 0.8,
    still run: ``Iterations.execute`` re-runs the block once per step). Nothing may follow an
    open-ended ``with tracer.all()`` in the trace: nnsight never runs it."""
    # iter-all-next.md "`tracer.all()`", block form: append gives one item per step; a name
    # bound to .save() inside holds the last step's value
    with model.generate(PROMPT, max_new_tokens=4) as tracer:
        hs = list().save()
        with tracer.all():
            last = model.model.layers[0].output.save()
            hs.append(model.model.layers[0].output)
    out["with_all"] = {"shapes": [list(h.shape) for h in hs],
                       "hidden": [_rows(h[0, -1]) for h in hs],
                       "saved_shape": list(last.shape), "saved": _rows(last[0, -1]),
                       "saved_is_last": bool(torch.equal(last, hs[-1]))}

    # the block's Python runs once per step too
    with model.generate(PROMPT, max_new_tokens=4) as tracer:
        count = [0]
        counts = list().save()
        with tracer.all():
            model.model.layers[0].output  # noqa: B018 (each step waits for the model here)
            count[0] += 1
            counts.append(count[0])
    out["with_all_counter"] = list(counts)

    # edit every step in the block form, read the predictions per step
    with model.generate(PROMPT, max_new_tokens=3) as tracer:
        preds = list().save()
        with tracer.all():
            model.model.layers[0].output[:] = 0
            preds.append(model.lm_head.output[0, -1].argmax(dim=-1))
    out["with_all_zero"] = [int(p) for p in preds]

    # iter-all-next.md "Slice", block form: steps 0..2; an edit at steps 1 and 2 only
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        first3 = list().save()
        with tracer.iter[0:3]:
            first3.append(model.model.layers[0].output)
    with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
        mid = list().save()
        with tracer.iter[1:3]:
            model.model.layers[0].output[:] = 0
            mid.append(model.lm_head.output[0, -1].argmax(dim=-1))
        ids = tracer.result.save()
    out["with_iter"] = {"shapes": [list(h.shape) for h in first3],
                        "hidden": [_rows(h[0, -1]) for h in first3],
                        "edit_1_3_predictions": [int(p) for p in mid], "edit_1_3_ids": _rows(ids)}


if __name__ == "__main__":
    main(sys.argv[1])
