"""Any model (issue 15): ``NNsight(module)`` for any ``torch.nn.Module``, and
``LanguageModel(loaded_hf_model, tokenizer=tok)``; values checked against raw forward hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import vinterp
from vinterp import ir
from vinterp.tracing.errors import TracingError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _hooked(module: nn.Module, target: nn.Module, x: Any, patch: Any = None
            ) -> tuple[Any, Any, Any]:
    """(target's input, target's output, the model output) with a raw forward hook;
    ``patch(output) -> output`` replaces the target's output."""
    seen: dict[str, Any] = {}

    def hook(mod: nn.Module, args: Any, out: Any) -> Any:
        seen["in"] = args[0].detach().clone()
        seen["out"] = out.detach().clone()
        return patch(out) if patch is not None else None

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        handle.remove()
    return seen["in"], seen["out"], out


def test_mlp_read_equals_raw_hook() -> None:
    net = _mlp()
    model = vinterp.NNsight(net)
    x = torch.randn(5, 4)
    with model.trace(x):
        h = model.fc1.output.save()
        a_in = model.act.input.save()
        fc2_in = model.fc2.inputs[0][0].save()
        out = model.output.save()
    raw_in, raw_out, raw = _hooked(net, net.fc1, x)
    torch.testing.assert_close(h, raw_out, rtol=0, atol=0)
    torch.testing.assert_close(a_in, raw_out, rtol=0, atol=0)
    torch.testing.assert_close(fc2_in, torch.relu(raw_out), rtol=0, atol=0)
    torch.testing.assert_close(out, raw, rtol=0, atol=0)
    assert model._model is net


def test_mlp_edit_equals_raw_hook_patch() -> None:
    net = _mlp()
    model = vinterp.NNsight(net)
    x = torch.randn(5, 4)

    def patch(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, :4] = 0
        return out

    with model.trace(x):
        model.fc1.output[:, :4] = 0
        out = model.output.save()
    _, _, raw = _hooked(net, net.fc1, x, patch)
    torch.testing.assert_close(out, raw, rtol=0, atol=0)
    # the edit belongs to that trace only
    with model.trace(x):
        clean = model.output.save()
    torch.testing.assert_close(clean, net(x).detach(), rtol=0, atol=0)


def test_mlp_invokes_batch_and_patch_across() -> None:
    net = _mlp()
    model = vinterp.NNsight(net)
    x, y = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        with tracer.invoke(x):
            hx = model.fc1.output.save()
        with tracer.invoke(y):
            model.fc1.output[:] = hx[:1]
            out = model.output.save()
    assert hx.shape == (2, 8) and out.shape == (3, 3)
    with torch.no_grad():
        source = net.fc1(x[:1])
    _, _, raw = _hooked(net, net.fc1, y, lambda o: source.expand_as(o))
    torch.testing.assert_close(out, raw)


def test_mlp_gradient_and_scan() -> None:
    net = _mlp()
    model = vinterp.NNsight(net)
    x = torch.randn(5, 4)
    with model.trace(x):
        g = model.fc1.output.grad.save()
        model.output.sum().backward()
    h = net.fc1(x)
    h.retain_grad()
    net.fc2(net.act(h)).sum().backward()
    torch.testing.assert_close(g, h.grad)
    net.zero_grad()
    with model.scan(x):
        shape = model.fc2.output.shape
    assert tuple(shape) == (5, 3)


class _Residual(nn.Module):
    """``h + fc(norm(h))``: ``norm``'s input is also the residual (a pre-norm block)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return h + self.fc(self.norm(h))


def test_input_grad_with_two_invokes_includes_the_residual_share() -> None:
    """``norm.input.grad`` of each invoke is raw PyTorch's (a pre-hook's ``retain_grad`` on the
    prompt alone), with the share through the residual. Before: with two invokes each was
    missing exactly that share (off by 1.0 everywhere for ``output.sum()``)."""
    torch.manual_seed(0)
    net = _Residual()
    model = vinterp.NNsight(net)
    xs = [torch.randn(2, 4), torch.randn(3, 4)]
    grads = []
    with model.trace() as tracer:
        for x in xs:
            with tracer.invoke(x):
                grads.append(model.norm.input.grad.save())
        with tracer.invoke():
            model.output.sum().backward()
    for x, got in zip(xs, grads, strict=True):
        seen = {}

        def pre(mod: nn.Module, args: Any) -> None:
            args[0].retain_grad()
            seen["h"] = args[0]

        handle = net.norm.register_forward_pre_hook(pre)
        try:
            net(x).sum().backward()
        finally:
            handle.remove()
        net.zero_grad()
        torch.testing.assert_close(got, seen["h"].grad)


class _KeywordCalls(nn.Module):
    """Submodules called with keyword arguments only: ``sub``'s first parameter (``mask``) is
    not passed, ``star`` takes ``*args, **kwargs``."""

    class Sub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, mask: Any = None, hidden: Any = None) -> torch.Tensor:
            h = self.lin(hidden)
            return h if mask is None else h * mask

    class Star(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.lin(kwargs["hidden"])

    def __init__(self) -> None:
        super().__init__()
        self.sub = self.Sub()
        self.star = self.Star()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.star(hidden=self.sub(hidden=x))


def test_input_of_a_module_called_with_keywords_only_is_the_first_passed() -> None:
    """``.input`` is the first argument passed (nnsight's rule): here the keyword
    ``hidden``, where the signature's first parameter (``mask``, ``*args``) is not passed.
    Before: ``.input`` was None, ``sub.input[:] = 0`` a TypeError and ``star.input = v`` a
    no-op (0.67 off). Reads and edits equal raw pre-hooks on ``kwargs["hidden"]``."""
    torch.manual_seed(0)
    net = _KeywordCalls()
    model = vinterp.NNsight(net)
    x = torch.randn(2, 4)
    seen: dict[str, torch.Tensor] = {}

    def raw(edit: Any = None) -> torch.Tensor:
        def pre(name: str) -> Any:
            def hook(mod: nn.Module, args: Any, kwargs: Any) -> Any:
                seen[name] = kwargs["hidden"].clone()
                if edit is not None and edit[0] == name:
                    return args, {**kwargs, "hidden": edit[1](kwargs["hidden"])}
                return None
            return hook
        handles = [getattr(net, n).register_forward_pre_hook(pre(n), with_kwargs=True)
                   for n in ("sub", "star")]
        try:
            with torch.no_grad():
                return net(x)
        finally:
            for h in handles:
                h.remove()

    with model.trace(x):
        sub_in = model.sub.input.save()
        star_in = model.star.input.save()
    ref = raw()
    torch.testing.assert_close(sub_in, seen["sub"], rtol=0, atol=0)
    torch.testing.assert_close(star_in, seen["star"], rtol=0, atol=0)
    with model.trace(x):
        model.sub.input[:, :2] = 0
        out = model.output.save()
    ref = raw(("sub", lambda h: torch.cat([torch.zeros_like(h[:, :2]), h[:, 2:]], 1)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with model.trace(x):
        model.star.input = torch.ones(2, 4)
        out = model.output.save()
    ref = raw(("star", lambda h: torch.ones(2, 4)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_mlp_keyword_inputs_and_errors() -> None:
    net = _mlp()
    model = vinterp.NNsight(net)
    x = torch.randn(2, 4)
    with model.trace(x=x):
        out = model.output.save()
    torch.testing.assert_close(out, net(x).detach())
    with pytest.raises(TracingError, match="generate"):
        model.generate(x)
    with pytest.raises(TypeError, match="nn.Module"):
        vinterp.NNsight("not a module")  # type: ignore[arg-type]


def test_language_model_from_loaded_object_equals_from_path(tiny_model_path: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path("tiny-llama")
    hf = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    loaded = vinterp.LanguageModel(hf, tokenizer=tok)
    named = vinterp.LanguageModel(path)
    assert loaded._model is hf
    results = []
    for model in (loaded, named):
        with model.trace("The Eiffel Tower is in"):
            h = model.layers[1].output.save()
            model.layers[0].output[:, -1] = 0
            logits = model.logits.save()
        with model.scan("Hello"):
            shape = model.model.layers[0].mlp.output.shape
        results.append((h, logits, tuple(shape)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][2] == results[1][2]
    with pytest.raises(TypeError, match="loaded model"):
        vinterp.LanguageModel(hf, tokenizer=tok, dtype=torch.float16)


def test_classifier_logits_are_not_cut_as_a_sequence(tiny_model_path: Any) -> None:
    """A sequence classifier's ``[batch, labels]`` logits, in a padded batch whose width
    equals the number of labels: the short invoke gets all its labels, as run alone (they
    were cut to its 2 tokens, as if labels were positions)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    long, short = "The Eiffel Tower is in the city of", "Hi there"
    ids = [tok(p, return_tensors="pt").input_ids for p in (long, short)]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      num_labels=ids[0].shape[1], pad_token_id=tok.eos_token_id)
    net = LlamaForSequenceClassification(cfg).eval()
    lm = vinterp.LanguageModel(net, tokenizer=tok)
    with lm.trace() as tracer:
        with tracer.invoke(long):
            a = lm.output.logits.save()
        with tracer.invoke(short):
            b = lm.output.logits.save()
    with torch.no_grad():
        want = [net(i).logits for i in ids]
    assert ids[1].shape[1] < ids[0].shape[1]
    for got, ref in zip((a, b), want, strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_module_run_twice_says_its_first_call_is_served() -> None:
    """A shared module called twice per forward: vinterp serves its first call, as a raw hook
    on the first call sees it, and warns that the later calls run unchanged."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(x)))

    torch.manual_seed(0)
    net = Twice().eval()
    m = vinterp.NNsight(net)
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="shared ran more than once .* first call only"):
        with m.trace(x):
            first = m.shared.output.save()
    with torch.no_grad():
        torch.testing.assert_close(first, net.shared(x))


def _tiny_mamba() -> Any:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=49152, hidden_size=64, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4)
    return MambaForCausalLM(config).eval()


def _tiny_vit() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       num_labels=5)
    return ViTForImageClassification(config).eval()


def test_mamba_first_trace_and_patching_equal_raw_hooks(tiny_model_path: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    mamba = _tiny_mamba()
    model = vinterp.LanguageModel(mamba, tokenizer=tok)
    prompt, other = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    layer = mamba.backbone.layers[1]
    # first trace: read a layer and the logits
    with model.trace(prompt):
        h = model.backbone.layers[1].output.save()
        logits = model.output.logits.save()
    ids = tok(prompt, return_tensors="pt").input_ids
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.clone()))
    with torch.no_grad():
        raw_logits = mamba(ids).logits
    handle.remove()
    torch.testing.assert_close(h, seen["h"], rtol=0, atol=0)
    torch.testing.assert_close(logits, raw_logits, rtol=0, atol=0)
    # patching: the last position's layer output from one prompt into another
    with model.trace() as tracer:
        with tracer.invoke(prompt):
            source = model.backbone.layers[1].output[:, -1].save()
        with tracer.invoke(other):
            model.backbone.layers[1].output[:, -1] = source
            patched = model.output.logits.save()

    def patch(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, -1] = seen["h"][:, -1]
        return o

    handle = layer.register_forward_hook(patch)
    with torch.no_grad():
        raw_patched = mamba(tok(other, return_tensors="pt").input_ids).logits
    handle.remove()
    torch.testing.assert_close(patched, raw_patched)
    with pytest.raises(AttributeError, match="model.backbone.layers"):
        model.layers  # noqa: B018
    # gradients flow
    with model.trace(prompt):
        grad = model.backbone.layers[0].output.grad.save()
        model.output.logits[0, -1].sum().backward()
    assert grad.shape == h.shape and grad.abs().sum() > 0


def test_vit_patch_token_patching_equals_raw_hooks() -> None:
    vit = _tiny_vit()
    model = vinterp.NNsight(vit)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    layer = vit.vit.layers[0]   # this transformers' ViT path (older ones: vit.encoder.layer)
    with model.trace(images):
        h = model.vit.layers[0].output.save()
        logits = model.output.logits.save()
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    with torch.no_grad():
        raw = vit(images).logits
    handle.remove()
    torch.testing.assert_close(h, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(logits, raw, rtol=0, atol=0)
    # patch token 3's residual from image 0 into image 1
    with model.trace() as tracer:
        with tracer.invoke(images[:1]):
            source = model.vit.layers[0].output[:, 3].save()
        with tracer.invoke(images[1:]):
            model.vit.layers[0].output[:, 3] = source
            patched = model.output.logits.save()

    def patch(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, 3] = seen[0][:1, 3]
        return o

    handle = layer.register_forward_hook(patch)
    with torch.no_grad():
        raw_patched = vit(images[1:]).logits
    handle.remove()
    torch.testing.assert_close(patched, raw_patched)
    assert not torch.allclose(patched, raw[1:])
    with model.trace(images):
        grad = model.vit.layers[0].output.grad.save()
        model.output.logits.sum().backward()
    assert grad.shape == h.shape and grad.abs().sum() > 0


def test_vit_steering_shortcuts_index_the_values_own_positions() -> None:
    """The steering shortcuts on an ``NNsight`` model: without token prompts, ``positions``
    index dim -2 of the value itself (the patch tokens here). They once failed on any value
    whose dim -2 was not 2 ("2 positions for 17 rows"): each input is recorded as a
    two-token placeholder prompt, whose positions reached the kernel."""
    vit = _tiny_vit()
    model = vinterp.NNsight(vit)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    v = torch.randn(vit.config.hidden_size)
    layer = vit.vit.layers[0]

    def raw(edit: Any) -> torch.Tensor:
        handle = layer.register_forward_hook(lambda m, a, o: edit(o.clone()))
        with torch.no_grad():
            out = vit(images).logits
        handle.remove()
        return out

    def last(o: torch.Tensor) -> torch.Tensor:
        o[:, -1] += 2.0 * v
        return o

    def first_two(o: torch.Tensor) -> torch.Tensor:
        o[:, :2] *= 0.5
        return o

    cases = [
        (lambda h: h.steer(v, scale=2.0), lambda o: o + 2.0 * v),
        (lambda h: h.steer(v, scale=2.0, positions=-1), last),
        (lambda h: h.scale(0.5, positions=[0, 1]), first_two),
        (lambda h: h.replace(v), lambda o: v.expand_as(o).clone()),
    ]
    for shortcut, edit in cases:
        with model.trace(images):
            shortcut(model.vit.layers[0].output)
            got = model.output.logits.save()
        torch.testing.assert_close(got, raw(edit))


def _tiny_bert(tok: Any) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=128, num_labels=3,
                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return BertForSequenceClassification(cfg).eval()


def test_encoder_invokes_of_different_lengths_equal_each_alone(tiny_model_path: Any) -> None:
    """A BERT classifier's pooler reads column 0 ([CLS]): with left padding the shorter
    invoke's logits read a pad token there (0.018 off, the pooler output 0.28), silently.
    Encoders are padded on the right; every invoke equals its prompt run alone, steering at
    a position included."""
    from transformers import AutoTokenizer

    from vinterp.backends.hf.backend import attends_both_ways

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    net = _tiny_bert(tok)
    assert attends_both_ways(net)
    lm = vinterp.LanguageModel(net, tokenizer=tok)
    prompts = ["The Eiffel Tower is in the city of", "Hello there"]
    v = torch.randn(64)
    got = []
    with lm.trace() as tracer:
        for p in prompts:
            with tracer.invoke(p):
                lm.bert.encoder.layer[0].output.steer(v, positions=-1)
                got.append((lm.output.logits.save(), lm.bert.output.pooler_output.save(),
                            lm.bert.encoder.layer[1].output.save()))
    for p, (logits, pooled, hidden) in zip(prompts, got, strict=True):
        ids = tok(p, return_tensors="pt").input_ids

        def steer(m: Any, a: Any, o: Any) -> Any:
            o = o.clone()
            o[:, -1] += v
            return o

        seen: list[torch.Tensor] = []
        handles = [net.bert.encoder.layer[0].register_forward_hook(steer),
                   net.bert.encoder.layer[1].register_forward_hook(
                       lambda m, a, o: seen.append(o.clone()))]
        with torch.no_grad():
            ref = net(ids)
        for h in handles:
            h.remove()
        torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(hidden, seen[0], rtol=0, atol=1e-5)
        with torch.no_grad():
            pooled_ref = net.bert.pooler(seen[0])
        torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=1e-5)


def test_dataclass_outputs_are_cut_per_invoke_and_their_fields_read() -> None:
    """A module returning a dataclass: its fields are read as attributes (they were refused:
    "not available on a vinterp proxy"), and each invoke sees and edits its own rows (the
    whole batch's dataclass reached every invoke, so an edit in one changed the other)."""
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor

    class Sub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> Pair:
            return Pair(self.lin(x), torch.tanh(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sub, self.head = Sub(), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o = self.sub(x)
            return self.head(o.a * o.b)

    torch.manual_seed(0)
    net = Net().eval()
    model = vinterp.NNsight(net)
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a1 = model.sub.output.a.save()
            out1 = model.output.save()
        with tracer.invoke(x2):
            model.sub.output.b[:] = 0
            out2 = model.output.save()
    # (batched with other rows, a matmul may round differently from the prompt alone: 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(a1, net.sub.lin(x1), rtol=0, atol=1e-6)
        torch.testing.assert_close(out1, net(x1), rtol=0, atol=1e-6)
        torch.testing.assert_close(out2, net.head.bias.expand(3, 3), rtol=0, atol=1e-6)
    x3 = torch.randn(2, 4)
    with model.trace() as tracer:       # the whole value patched from another invoke
        with tracer.invoke(x1):
            source = model.sub.output
        with tracer.invoke(x3):
            model.sub.output = source
            patched = model.output.save()
        with tracer.invoke(x2):
            out2 = model.output.save()
    with torch.no_grad():
        torch.testing.assert_close(patched, net(x1), rtol=0, atol=1e-6)
        torch.testing.assert_close(out2, net(x2), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="a Pair has no field 'c'; its fields are"):
        with model.trace(x1):
            model.sub.output.c.save()
    with pytest.raises(AttributeError, match="'meen' is not available on a vinterp proxy"):
        with model.trace(x1):
            model.sub.output.a.meen()


def _tiny_encoder(tok: Any, family: str) -> Any:
    """A tiny random sequence classifier of ``family`` (3 labels, 64 wide, 2 layers)."""
    import transformers as T

    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=128, num_labels=3)
    if family == "roberta":   # numbers positions from padding_idx + 1 (= 2)
        return T.RobertaForSequenceClassification(T.RobertaConfig(
            **shape, pad_token_id=1, max_position_embeddings=64)).eval()
    if family == "mpnet":     # padding_idx + 1 too, and no is_causal flag
        return T.MPNetForSequenceClassification(T.MPNetConfig(
            **shape, pad_token_id=tok.eos_token_id)).eval()
    return T.DebertaV2ForSequenceClassification(T.DebertaV2Config(   # no is_causal flag
        **shape, pad_token_id=tok.eos_token_id)).eval()


def _first(value: Any) -> Any:
    """A layer's hidden states (MPNet's layers return a tuple)."""
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_roberta_family_positions_equal_the_model_run_alone(tiny_model_path: Any,
                                                            family: str) -> None:
    """RoBERTa-style embeddings number a prompt's positions from ``padding_idx + 1`` when
    given no ``position_ids``, and use given ones verbatim. Given ids counting from 0, one
    prompt's layer-0 output was 2.3 off and its logits 0.015 (RoBERTa; MPNet's 0.038): an
    encoder's forward now gets no position ids, and its values equal ``net(ids)``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    net = _tiny_encoder(tok, family)
    lm = vinterp.LanguageModel(net, tokenizer=tok)
    prompt = "The Eiffel Tower is in the city of Paris, which is in France"
    layer = net.base_model.encoder.layer[0]
    with lm.trace(prompt):
        hidden = getattr(lm, net.base_model_prefix).encoder.layer[0].output.save()
        logits = lm.output.logits.save()
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(_first(o).clone()))
    try:
        with torch.no_grad():
            ref = net(tok(prompt, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    torch.testing.assert_close(_first(hidden), seen[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)


def test_a_left_padded_roberta_decoder_counts_positions_by_its_own_rule(
        tiny_model_path: Any) -> None:
    """A RoBERTa decoder (left-padded: it generates) given position ids counting from 0
    would be off for every prompt; they follow the model's ``padding_idx + 1`` rule, so two
    invokes of different lengths equal each prompt run alone."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForCausalLM

    from vinterp.backends.hf.backend import attends_both_ways

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    torch.manual_seed(0)
    net = RobertaForCausalLM(RobertaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, pad_token_id=1, max_position_embeddings=64,
        is_decoder=True)).eval()
    assert not attends_both_ways(net)
    _assert_invokes_equal_each_alone(net, tok, "logits")


@pytest.mark.parametrize("family", ["deberta", "mpnet"])
def test_encoders_without_a_causal_flag_are_padded_right(tiny_model_path: Any,
                                                         family: str) -> None:
    """DeBERTa-v2 and MPNet attention modules carry no ``is_causal`` flag; they were taken
    for decoders and padded on the left, so the shorter invoke's classifier read a pad at
    column 0 ([CLS]; DeBERTa's logits 0.028 off). A model that cannot generate is an
    encoder: two invokes of different lengths equal each prompt run alone."""
    from transformers import AutoTokenizer

    from vinterp.backends.hf.backend import attends_both_ways

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    net = _tiny_encoder(tok, family)
    assert attends_both_ways(net)
    _assert_invokes_equal_each_alone(net, tok, "logits")


def _assert_invokes_equal_each_alone(net: nn.Module, tok: Any, field: str) -> None:
    """Two prompts of different lengths in two invokes: the output's ``field`` of each
    equals the model run on that prompt alone."""
    lm = vinterp.LanguageModel(net, tokenizer=tok)
    prompts = ["The Eiffel Tower is in the city of", "Hello there"]
    got = []
    with lm.trace() as tracer:
        for p in prompts:
            with tracer.invoke(p):
                got.append(getattr(lm.output, field).save())
    for p, value in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = getattr(net(tok(p, return_tensors="pt").input_ids), field)
        torch.testing.assert_close(value, ref, rtol=0, atol=1e-5)


def test_a_base_mamba_taken_for_an_encoder_still_equals_each_prompt_alone(
        tiny_model_path: Any) -> None:
    """A causal model with no attention flag that cannot generate (a base ``MambaModel``)
    is padded on the right by that rule; its prompts' values are still their own."""
    from transformers import AutoTokenizer

    from vinterp.backends.hf.backend import attends_both_ways

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    net = _tiny_mamba().backbone
    assert attends_both_ways(net)
    _assert_invokes_equal_each_alone(net, tok, "last_hidden_state")


def test_token_type_ids_of_an_encoding_reach_the_model(tiny_model_path: Any) -> None:
    """A sentence-pair encoding's ``token_type_ids`` were dropped: logits equalled the run
    without them (7e-4 off the real run on a tiny random BERT). Each prompt now runs with its
    own: a padded batch of two pairs in one trace, and in two invokes the same tokens with and
    without segment ids (then a trace without them: none left over), equal the raw model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path("tiny-llama"))
    net = _tiny_bert(tok)
    lm = vinterp.LanguageModel(net, tokenizer=tok)

    def pair(a: str, b: str) -> tuple[list[int], list[int]]:
        first = tok(a, add_special_tokens=False)["input_ids"]
        second = tok(b, add_special_tokens=False)["input_ids"]
        return first + second, [0] * len(first) + [1] * len(second)

    def raw(ids: list[int], types: list[int] | None) -> torch.Tensor:
        with torch.no_grad():
            return net(input_ids=torch.tensor([ids]), token_type_ids=None if types is None
                       else torch.tensor([types])).logits

    (ids_a, tt_a), (ids_b, tt_b) = pair("The cat sat on the mat", "A feline rested"), \
        pair("Hi", "Hello there friend")
    width = max(len(ids_a), len(ids_b))
    pad = tok.pad_token_id

    def right(row: list[int], value: int) -> list[int]:
        return row + [value] * (width - len(row))

    batch = {"input_ids": torch.tensor([right(ids_a, pad), right(ids_b, pad)]),
             "attention_mask": torch.tensor([right([1] * len(ids_a), 0),
                                             right([1] * len(ids_b), 0)]),
             "token_type_ids": torch.tensor([right(tt_a, 0), right(tt_b, 0)])}
    with lm.trace(batch):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits[0:1], raw(ids_a, tt_a), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[1:2], raw(ids_b, tt_b), rtol=0, atol=1e-6)
    assert (raw(ids_a, tt_a) - raw(ids_a, None)).abs().max() > 1e-4   # the ids matter
    with lm.trace() as tracer:
        with tracer.invoke({"input_ids": [ids_a], "token_type_ids": [tt_a]}):
            typed = lm.output.logits.save()
        with tracer.invoke([ids_a]):
            plain = lm.output.logits.save()
    torch.testing.assert_close(typed, raw(ids_a, tt_a), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, raw(ids_a, None), rtol=0, atol=1e-6)
    with lm.trace([ids_a]):
        later = lm.output.logits.save()
    torch.testing.assert_close(later, raw(ids_a, None), rtol=0, atol=1e-6)
    # they travel in the graph, as data (remote traces get them), and an engine that runs
    # token ids only refuses them rather than running without
    graph = ir.load(ir.dumps(tracer.graph))
    assert [list(given) for given in graph.invokes[0].token_inputs] == [["token_type_ids"]]
    assert graph.invokes[1].token_inputs == ()
    from vinterp.backends.vllm.backend import check_graph
    from vinterp.models.architectures import for_model_type

    with pytest.raises(ValueError, match="invoke 0's prompts come with token_type_ids"):
        check_graph(graph, for_model_type("llama"), torch.float32, 2048)
