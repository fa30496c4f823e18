"""``make demo``: the main job on the embedded default model (smollm2-135m), locally.

1. a plain greedy completion of "The capital of France is";
2. a trace that saves a residual stream and patches it across prompts (the seed's example);
3. a steered generation with a vector built from two contrastive prompts.

(When the server lands, this demo moves behind ``vinterp serve`` and the OpenAI client.)
"""

from __future__ import annotations

import torch

from vinterp import LanguageModel

PROMPT = "The capital of France is"
LAYER = 8


def _completion(model: LanguageModel, ids: torch.Tensor, prompt_len: int) -> str:
    return model.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)


def main() -> None:
    """Run the three steps and print what each gives."""
    model = LanguageModel("smollm2-135m", dtype=torch.float32)
    prompt_len = len(model.tokenizer(PROMPT)["input_ids"])

    with model.generate(PROMPT, max_new_tokens=8) as tracer:
        pass
    print(f"plain:    {PROMPT!r} -> {_completion(model, tracer.result[0], prompt_len)!r}")

    with model.trace("The Eiffel Tower is in the city of"):
        clean = model.layers[LAYER].output.save()
    with model.trace("The Colosseum is in the city of"):
        model.layers[LAYER].output[:] = clean
        patched = model.logits.save()
    paris = model.tokenizer.encode(" Paris")[0]
    p = torch.softmax(patched[0, -1], dim=-1)[paris].item()
    print(f"trace:    layer {LAYER} residual {tuple(clean.shape)}; patched Eiffel->Colosseum: "
          f"P(' Paris') = {p:.3f}")

    with model.trace() as tracer:
        with tracer.invoke("I love this. It is wonderful and"):
            pos = model.layers[LAYER].output[0].mean(dim=0).save()
        with tracer.invoke("I hate this. It is terrible and"):
            neg = model.layers[LAYER].output[0].mean(dim=0).save()
    vector = pos - neg
    with model.generate(PROMPT, max_new_tokens=12) as tracer:
        with tracer.all():
            model.layers[LAYER].output.steer(vector, scale=4.0)
    print(f"steered:  {PROMPT!r} -> {_completion(model, tracer.result[0], prompt_len)!r}")


if __name__ == "__main__":
    main()
