"""The HF backend on a CUDA GPU: device placement and dtypes (skipped without a GPU).

Each test compares vinterp on CUDA with a reference computed by plain PyTorch on the same
CUDA model (hooks, autograd, ``generate``), or with the same trace on the CPU. Inputs users
pass from the CPU (steering vectors, patch values, token ids) must land on the model's device
and dtype without the user moving them.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello", "The Eiffel Tower is in the city of", "One two three four"]
_MODELS: dict[tuple[str, str, torch.dtype], object] = {}


def _model(name: str, device: str, dtype: torch.dtype = torch.float32):  # noqa: ANN202
    from vinterp import LanguageModel

    key = (name, device, dtype)
    if key not in _MODELS:
        _MODELS[key] = LanguageModel(name, device_map=device, dtype=dtype)
    return _MODELS[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_saves_live_on_the_gpu_and_equal_raw_hooks(name):
    model = _model(name, "cuda")
    layer = model.architecture.layer(1)
    with model.trace() as tracer:
        got = []
        for p in PROMPTS:
            with tracer.invoke(p):
                got.append((model.layers[1].output.save(), model.logits.save()))
    mods = dict(model._model.named_modules())
    for p, (hid, logits) in zip(PROMPTS, got, strict=True):
        assert hid.device.type == "cuda" and logits.device.type == "cuda"
        store = {}
        h = mods[layer].register_forward_hook(lambda m, a, o: store.__setitem__("h", o))
        try:
            ids = torch.tensor([model.tokenizer(p)["input_ids"]], device="cuda")
            with torch.no_grad():
                ref_logits = model._model(input_ids=ids).logits
        finally:
            h.remove()
        ref_h = store["h"][0] if isinstance(store["h"], tuple) else store["h"]
        # batched with left padding vs alone: different kernels on a GPU, same math
        assert _rel(hid, ref_h) < 1e-4 and _rel(logits, ref_logits) < 1e-4


def test_gpu_trace_equals_cpu_trace():
    cpu, gpu = _model("tiny-llama", "cpu"), _model("tiny-llama", "cuda")
    out = {}
    for tag, model in (("cpu", cpu), ("gpu", gpu)):
        with model.trace() as tracer:
            vals = []
            for p in PROMPTS:
                with tracer.invoke(p):
                    model.layers[0].output[:, -1] = model.layers[0].output[:, -1] * 0.5
                    vals.append(model.layers[1].mlp.output.save())
                    vals.append(model.model.norm.output.save())
        out[tag] = vals
    for a, b in zip(out["gpu"], out["cpu"], strict=True):
        assert a.device.type == "cuda"
        assert _rel(a, b) < 1e-4


def test_cpu_vectors_steer_a_bf16_gpu_model_like_a_raw_hook():
    model = _model("tiny-llama", "cuda", torch.bfloat16)
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size) * 4            # float32, on the CPU
    prompt = "Once upon a time"
    with model.generate(prompt, max_new_tokens=8, ignore_eos=True) as tracer:
        with tracer.all():
            model.layers[0].output.steer(v)
            steered = model.layers[0].output.save()
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]], device="cuda")
    vb = v.to("cuda", torch.bfloat16)

    def hook(mod, args, out):  # noqa: ANN001, ANN202
        return (out[0] + vb,) + tuple(out[1:]) if isinstance(out, tuple) else out + vb

    h = model._model.model.layers[0].register_forward_hook(hook)
    try:
        ref = model._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=model._pad_id)[0]
    finally:
        h.remove()
    assert tracer.result[0].tolist() == ref.tolist()
    assert steered[0].dtype == torch.bfloat16 and steered[0].device.type == "cuda"


def test_patching_with_a_cpu_tensor_and_across_invokes():
    model = _model("tiny-llama", "cuda")
    patch = torch.zeros(1, model.config.hidden_size)         # CPU
    with model.trace() as tracer:
        with tracer.invoke(PROMPTS[1]):
            clean = model.layers[0].output
        with tracer.invoke(PROMPTS[2]):
            model.layers[0].output[:, -1] = clean[:, -1]
            moved = model.layers[0].output[:, -1].save()
        with tracer.invoke(PROMPTS[2]):
            model.layers[0].output[:, 0] = patch
            zeroed = model.layers[0].output[:, 0].save()
        with tracer.invoke(PROMPTS[1]):
            clean_last = model.layers[0].output[:, -1].save()
    assert _rel(moved, clean_last) < 1e-6   # the same prompt in the same batch
    assert zeroed.device.type == "cuda" and float(zeroed.abs().max()) == 0.0


def test_gradients_on_the_gpu_equal_autograd():
    model = _model("tiny-gpt2", "cuda")
    with model.trace("The quick brown fox"):
        hidden = model.transformer.h[0].output.save()
        hidden.retain_grad()
        logits = model.output.logits
        loss = -logits[0, -1, 5]
        loss.backward()
    grad = hidden.grad
    model._model.zero_grad(set_to_none=True)
    ids = torch.tensor([model.tokenizer("The quick brown fox")["input_ids"]], device="cuda")
    store = {}
    h = model._model.transformer.h[0].register_forward_hook(
        lambda m, a, o: store.__setitem__("h", o))
    try:
        out = model._model(input_ids=ids).logits
        (ref,) = torch.autograd.grad(-out[0, -1, 5], store["h"])
    finally:
        h.remove()
    assert grad.device.type == "cuda" and _rel(grad, ref) < 1e-5


def test_attention_probs_on_the_gpu_equal_the_cpu():
    out = {}
    for dev in ("cpu", "cuda"):
        model = _model("tiny-gpt2", dev)
        with model.trace(PROMPTS[1]):
            out[dev] = model.transformer.h[1].attn.attn_dropout.input.save()
    assert out["cuda"].device.type == "cuda"
    sums = out["cuda"].sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert _rel(out["cuda"], out["cpu"]) < 1e-4


def test_capture_transport_keeps_the_device():
    from vinterp_vllm.wire import pack, unpack

    x = torch.randn(3, 4, device="cuda").to(torch.bfloat16)
    back = unpack(pack({"x": [x]}))["x"][0]
    assert back.device.type == "cuda" and back.dtype == torch.bfloat16
    assert torch.equal(back, x)


@pytest.mark.parametrize("op", ["steer", "ablate", "clamp"])
def test_position_selected_steering_on_the_gpu_equals_the_cpu(op):
    torch.manual_seed(1)
    v = torch.randn(64)
    kwargs = {"steer": {"vector": v, "positions": [0, -1]},
              "ablate": {"direction": v, "positions": "generated"},
              "clamp": {"direction": v, "min": -0.1, "max": 0.1, "positions": slice(1, None)}}[op]
    out = {}
    for dev in ("cpu", "cuda"):
        model = _model("tiny-llama", dev)
        with model.generate() as tracer:
            for p in PROMPTS:
                with tracer.invoke(p, max_new_tokens=4):
                    with tracer.all():
                        getattr(model.layers[0].output, op)(**kwargs)
                        model.layers[1].output.save()
        out[dev] = [r.tolist() for r in tracer.result]
    assert out["cuda"] == out["cpu"]


def test_traces_run_with_the_gpu_as_torch_default_device():
    """``torch.set_default_device("cuda")`` is common in notebooks; IR constants must still
    decode (they go through numpy on the host) and land on the model's device."""
    model = _model("tiny-llama", "cuda")
    with torch.device("cuda"):
        v = torch.ones(model.config.hidden_size)              # a CUDA vector
        with model.trace(PROMPTS[1]):
            model.layers[0].output.steer(v, positions=[-1])
            out = model.layers[0].output.save()
        with model.trace(PROMPTS[1]):
            ref = model.layers[0].output.save()
    assert torch.equal(out[:, :-1], ref[:, :-1])
    assert torch.allclose(out[:, -1], ref[:, -1] + 1, atol=1e-6)
