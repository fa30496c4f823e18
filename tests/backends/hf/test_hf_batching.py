"""BatchLayout: left padding, true position ids, per-invoke rows and positions."""

from __future__ import annotations

import torch

from vinterp.backends.hf.batching import BatchLayout


def test_layout_left_pads_with_true_positions():
    layout = BatchLayout.build([((1, 2, 3),), ((4,), (5, 6))], pad_id=0)
    assert layout.input_ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert layout.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert layout.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert layout.lengths.tolist() == [3, 1, 2]
    assert layout.rows(0) == slice(0, 1) and layout.rows(1) == slice(1, 3)
    assert layout.window(0) == (0, 3) and layout.window(1) == (1, 3)
    assert layout.prompt_lens(1).tolist() == [[1], [2]]


def test_row_positions_prompt_and_decode_steps():
    layout = BatchLayout.build([((1, 2, 3),), ((4,), (5, 6))], pad_id=0)
    assert layout.row_positions(0, 0).tolist() == [[0, 1, 2]]
    assert layout.row_positions(1, 0).tolist() == [[-1, 0], [0, 1]]
    assert layout.row_positions(1, 2).tolist() == [[2], [3]]


def test_subset_of_invokes():
    layout = BatchLayout.build([((1, 2, 3),), ((4,),)], pad_id=9, invokes=[1])
    assert layout.input_ids.tolist() == [[4]]
    assert layout.rows(1) == slice(0, 1)


def test_empty_prompt_refused():
    import pytest

    with pytest.raises(ValueError, match="no tokens"):
        BatchLayout.build([((),)], pad_id=0)


def test_padded_batch_equals_alone_on_the_raw_model(hf_model):
    model = hf_model("tiny-gptneox")
    prompts = [(5, 6, 7, 8, 9), (10, 11)]
    layout = BatchLayout.build([(p,) for p in prompts], model._pad_id)
    with torch.no_grad():
        batched = model._model(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                               position_ids=layout.position_ids).logits
        for b, p in enumerate(prompts):
            alone = model._model(input_ids=torch.tensor([p])).logits
            assert (batched[b, -len(p):] - alone[0]).abs().max() <= 1e-5


def test_encoders_pad_on_the_right():
    """Encoders read fixed columns (BERT's pooler: column 0), so their prompts are padded on
    the right; each invoke's window starts at column 0 and ends at its longest prompt."""
    layout = BatchLayout.build([((1, 2, 3),), ((4,), (5, 6))], pad_id=0, right=True)
    assert layout.input_ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert layout.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]
    assert layout.window(0) == (0, 3) and layout.window(1) == (0, 2)
    assert layout.row_positions(1, 0).tolist() == [[0, -1], [0, 1]]
    left = BatchLayout.build([((1, 2, 3),), ((4,), (5, 6))], pad_id=0)
    assert left.window(1) == (1, 3)


def test_token_fields_are_padded_like_the_ids():
    """Per-token inputs (``token_type_ids``) sit in their prompt's columns, 0 elsewhere and in
    rows of prompts without them, on either side."""
    types = {"token_type_ids": torch.tensor([0, 1])}
    for right, want in ((False, [[0, 0, 0], [0, 0, 1]]), (True, [[0, 0, 0], [0, 1, 0]])):
        layout = BatchLayout.build([((1, 2, 3),), ((4, 5),)], pad_id=0, right=right,
                                   fields_by_invoke=[[None], [types]])
        assert layout.fields["token_type_ids"].tolist() == want
    assert BatchLayout.build([((1, 2),)], pad_id=0).fields == {}
