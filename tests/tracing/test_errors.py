"""Every error of issue 3: clear messages that say what to do instead."""

from __future__ import annotations

import pytest
import torch

from vinterp.ir.errors import InterventionError
from vinterp.tracing.errors import TracingError

PROMPT = "Hello there friend"


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("tiny-llama")


def test_unknown_module_path_lists_nearest_names(model):
    with pytest.raises(AttributeError) as info:
        with model.trace(PROMPT):
            model.model.layers[0].self_atn.output.save()
    msg = str(info.value)
    assert "self_atn" in msg and "did you mean self_attn" in msg
    with pytest.raises(AttributeError, match="did you mean.*mlp"):
        with model.trace(PROMPT):
            model.layers[0].mpl.output.save()
    with pytest.raises(AttributeError, match="layers"):
        model.model.layerz  # noqa: B018


def test_module_lists_take_slices_and_integer_scalars(model):
    """``layers[:2]`` is a list of the layers (nnsight users loop over a slice), numpy's
    integers index like ints, and a wrong index type says so instead of "out of range"."""
    import numpy as np

    with model.trace(PROMPT):
        sliced = [layer.output.save() for layer in model.model.layers[:2]]
        one = model.model.layers[np.int64(1)].output.save()
        last = model.model.layers[-1].output.save()
    assert len(sliced) == 2 and torch.equal(sliced[1], one) and torch.equal(one, last)
    assert [e._path for e in model.model.layers[::-1]] == ["model.layers.1", "model.layers.0"]
    with pytest.raises(TypeError, match="takes an integer or a slice, not str"):
        model.model.layers["1"]
    with pytest.raises(IndexError, match="has 2 modules; index 5 is out of range"):
        model.model.layers[5]


def test_a_layers_output_0_warns_that_it_is_batch_row_0(model):
    """Code written for transformers 4 (the seed's ``h[5].output[0]``) means the hidden states;
    in transformers 5 it is batch row 0, which runs with other shapes: it warns, naming the
    fix. Row 0 spelled ``[0, :]``, and ``[0]`` of an attention's tuple, do not warn."""
    import warnings

    with pytest.warns(UserWarning, match=r"model.layers.1.output\[0\] is batch row 0.*"
                                         r"write \.output"):
        with model.trace(PROMPT):
            row = model.model.layers[1].output[0].save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.trace(PROMPT):
            same = model.model.layers[1].output[0, :].save()
            model.model.layers[1].self_attn.output[0].save()
            model.model.layers[1].output[1:].save()
    assert torch.equal(row, same) and row.dim() == 2


def test_nnsight_04_module_next_points_to_the_tracer(model):
    with pytest.raises(AttributeError, match=r"module.next\(\) is tracer.next\(\)"):
        with model.generate(PROMPT, max_new_tokens=2):
            model.model.layers[1].next()


def test_tracer_next_in_a_trace_is_refused_with_what_to_do(model):
    # it used to fail after the run with "this is a vinterp bug"
    with pytest.raises(TracingError, match=r"model\.trace runs one forward .*model\.generate"):
        with model.trace(PROMPT) as tracer:
            model.layers[0].output.save()
            tracer.next()


def test_unsaved_proxy_after_trace_names_save(model):
    with model.trace(PROMPT):
        h = model.layers[0].output
        kept = model.layers[0].output.save()
    assert isinstance(kept, torch.Tensor)
    with pytest.raises(TracingError, match=r"\.save\(\)"):
        h.shape  # noqa: B018
    with pytest.raises(TracingError, match=r"\.save\(\)"):
        h + 1  # noqa: B018
    with pytest.raises(TracingError, match=r"\.save\(\)"):
        h.mean()
    assert ".save()" in repr(h)


@pytest.mark.parametrize("what", ["item", "bool", "len", "iter", "if", "int"])
def test_data_dependent_python_is_refused(model, what):
    with pytest.raises(TracingError) as info:
        with model.trace(PROMPT):
            h = model.layers[0].output
            if what == "item":
                h.sum().item()
            elif what == "bool":
                bool(h.sum() > 0)
            elif what == "len":   # (len(h) of a known shape works: tests/compat)
                len(h.sum())
            elif what == "iter":
                for _ in h.sum():
                    pass
            elif what == "if":
                if h.sum() > 0:
                    pass
            else:
                int(h.sum())
    msg = str(info.value)
    assert "does not exist until the model runs" in msg
    assert "torch.where" in msg and ".save()" in msg  # the alternatives


def test_setitem_shape_mismatch_names_module_and_shapes(model):
    with pytest.raises(InterventionError) as info:
        with model.trace(PROMPT):
            model.layers[1].output[:, 0, :] = torch.zeros(3, 7)
    msg = str(info.value)
    assert "model.layers.1.output" in msg
    assert "[3, 7]" in msg and "[1, 64]" in msg
    assert "test_errors.py:" in msg  # points at the user's line


def test_output_assignment_shape_mismatch(model):
    with pytest.raises(InterventionError) as info:
        with model.trace(PROMPT):
            model.layers[1].output = torch.zeros(2, 2, 5)
    msg = str(info.value)
    assert "model.layers.1.output" in msg and "[2, 2, 5]" in msg


def test_reads_in_any_order_equal_forward_order(model):
    # the seed reads every layer's output, then every attention: order of access is free
    with model.trace(PROMPT):
        late_first = model.layers[1].output.save()
        early_second = model.layers[0].output.save()
    with model.trace(PROMPT):
        early = model.layers[0].output.save()
        late = model.layers[1].output.save()
    assert torch.equal(late_first, late) and torch.equal(early_second, early)


def test_edit_needing_a_later_value_of_its_own_invoke_explains(model):
    with pytest.raises(InterventionError, match="needs a value computed later"):
        with model.trace(PROMPT):
            late = model.layers[1].output
            model.layers[0].output[:] = late


def test_module_access_outside_invoke_and_trace(model):
    with pytest.raises(TracingError, match="outside any invoke"):
        with model.trace():
            model.layers[0].output.save()
    with pytest.raises(TracingError, match="only available inside"):
        model.layers[0].output  # noqa: B018


def test_cannot_set_attributes_on_proxies_or_envoys(model):
    with pytest.raises(TracingError, match="cannot set attribute 'foo' on a proxy"):
        with model.trace(PROMPT):
            model.layers[0].output.foo = 1
    with pytest.raises(TracingError, match="only .output, .input"):
        with model.trace(PROMPT):
            model.layers[0].weight = 1


def test_remote_needs_server(model, monkeypatch):
    monkeypatch.delenv("VINTERP_HOST", raising=False)
    with pytest.raises(ValueError, match="remote=True needs a server: set VINTERP_HOST"):
        with model.trace(PROMPT, remote=True):
            pass


def test_unsupported_value_in_graph(model):
    with pytest.raises(TracingError, match="cannot be part of an intervention graph"):
        with model.trace(PROMPT):
            model.layers[0].output + object()


def test_a_saved_value_returned_from_inside_the_block_says_so(model):
    """``return x.save()`` inside the ``with`` (or an attribute) holds the proxy, which the
    block's end does not rebind: the message must not claim the value was never saved, and
    says where it is."""
    def last_layer():
        with model.trace(PROMPT):
            return model.model.layers[-1].output.save()

    with pytest.raises(TracingError, match=r"saved value .* does not rebind.*`\.value`"):
        last_layer() + 1
    assert last_layer().value.shape[-1] == 64     # (the proxy holds it)
