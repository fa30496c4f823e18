"""``make demo``: greedy completion of "The capital of France is" on smollm2-135m.

Placeholder until the tracing API lands: plain transformers on the offline model.
"""

from __future__ import annotations

from vinterp.models import resolve_model

PROMPT = "The capital of France is"


def main() -> None:
    """Load smollm2-135m from the vinterp cache and print a greedy completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{PROMPT!r} -> {completion!r}")


if __name__ == "__main__":
    main()
