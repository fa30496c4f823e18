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

    path = Path(__file__).with_name("nnsight_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
