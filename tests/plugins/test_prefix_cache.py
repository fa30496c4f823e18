"""Prefix caching never mixes KV computed under different interventions.

vLLM caches full KV blocks by the hash of their tokens. A steered request's prompt blocks hold
steered keys/values: a plain request (or a capture) that reused them would see the steering,
and a steered request that reused plain blocks would skip its steering on those positions.
The vllm backend salts writing requests' cache (``cache_salt``) and makes requests that read
prompt positions skip reading the cache (``skip_reading_prefix_cache``).

These prompts span several KV blocks of a dedicated engine (``block_size=32``, the smallest
vLLM's CPU attention takes), so the cache really is hit; ``test_the_cache_is_hit`` proves it.
Each test starts from an empty cache and compares with a solo run on an empty cache (exact
tokens) and with the HF backend (captured values).
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from vllm import SamplingParams

from vinterp import LanguageModel

BLOCK = 32
NEW = 24                 # prompt 110 + 24 generated: the 4th block holds generated tokens


@pytest.fixture(scope="session")
def cached():
    # never closed (see conftest): closing would break the session's other engines
    return LanguageModel("tiny-llama", backend="vllm", block_size=BLOCK,
                         enable_prefix_caching=True, max_num_batched_tokens=512,
                         max_num_seqs=16, max_model_len=256, kv_cache_memory_bytes=2**26)


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("tiny-llama")


def _prompt(seed: int, n: int = 110) -> list[int]:
    return torch.randint(3, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


VEC = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 4


def _empty(lm) -> None:
    assert lm._backend.llm.reset_prefix_cache()


def _plain(lm, prompt) -> list[int]:
    with lm.generate(prompt, max_new_tokens=NEW, ignore_eos=True) as tracer:
        pass
    return tracer.result[0].tolist()


def _steered(lm, prompt, how: str, vector: torch.Tensor = VEC, save: bool = False):
    """Steer layer 0's output at every position of every step, the shortcut or the idiom;
    with ``save`` also return layer 1's output at every step (a whole-value save: with the
    shortcut the plugin's vectorized path serves both)."""
    with lm.generate(prompt, max_new_tokens=NEW, ignore_eos=True) as tracer:
        saved = list().save()
        with tracer.all():
            if how == "steer":
                lm.model.layers[0].output.steer(vector, scale=1.0, positions="all")
            else:
                lm.model.layers[0].output[:] += vector
            if save:
                saved.append(lm.model.layers[1].output)
    tokens = tracer.result[0].tolist()
    return (tokens, list(saved)) if save else tokens


def _prompt_steered(lm, prompt, how: str) -> list[int]:
    """Steer the prompt's positions only: generated tokens see it only through the KV."""
    with lm.generate(prompt, max_new_tokens=NEW, ignore_eos=True) as tracer:
        if how == "steer":
            with tracer.all():
                lm.model.layers[0].output.steer(VEC * 2, scale=1.0, positions="prompt")
        else:  # the prompt's forward is step 0
            lm.model.layers[0].output[:] += VEC * 2
    return tracer.result[0].tolist()


def _relu_inplace(lm, prompt) -> list[int]:
    """An edit written as a function called in place: nothing is assigned, yet layer 0's
    output changes (a writer as much as ``x[:] = relu(x)``)."""
    with lm.generate(prompt, max_new_tokens=NEW, ignore_eos=True) as tracer:
        with tracer.all():
            torch.nn.functional.relu(lm.model.layers[0].output, inplace=True)
    return tracer.result[0].tolist()


def _capture(lm, prompt, how: str | None = None) -> dict[str, torch.Tensor]:
    """Prompt-forward values (optionally steered as in :func:`_steered`)."""
    with lm.trace(prompt):
        if how == "steer":
            lm.model.layers[0].output.steer(VEC, scale=1.0, positions="all")
        elif how == "idiom":
            lm.model.layers[0].output[:] += VEC
        saved = {"model.layers.0": lm.model.layers[0].output.save(),
                 "model.layers.1": lm.model.layers[1].output.save(),
                 "mlp.input": lm.model.layers[1].mlp.input.save(),
                 "logits": lm.logits.save()}
    return dict(saved)


def _same_capture(got: dict, want: dict) -> None:
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) < 1e-4, (k, rel_err(got[k], want[k]))


def _solo(lm, fn, *args):
    _empty(lm)
    out = fn(lm, *args)
    _empty(lm)
    return out


def test_the_cache_is_hit(cached):
    """Without this the tests below could not fail: plain requests share prompt blocks."""
    prompt = _prompt(0)
    _empty(cached)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    first, second = (cached._backend.llm.generate([{"prompt_token_ids": prompt}], sp,
                                                  use_tqdm=False)[0] for _ in range(2))
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 3 * BLOCK
    # a continuation of the finished request reuses its generated tokens' block too
    more = prompt + list(second.outputs[0].token_ids)
    third = cached._backend.llm.generate([{"prompt_token_ids": more}], sp, use_tqdm=False)[0]
    assert third.num_cached_tokens == 4 * BLOCK


@pytest.mark.parametrize("how", ["steer", "idiom"])
def test_writer_then_reader(cached, hf, how):
    prompt = _prompt(1)
    plain = _solo(cached, _plain, prompt)
    steered = _solo(cached, _steered, prompt, how)
    assert steered != plain                       # the steering changes the tokens
    assert plain == _plain(hf, prompt)
    assert steered == _steered(hf, prompt, how)
    _steered(cached, prompt, how)
    assert _plain(cached, prompt) == plain
    # a plain continuation of the steered conversation (its generated block is cached too)
    cont = steered[:-1]
    want = _solo(cached, _plain, cont)
    _steered(cached, prompt, how)
    assert _plain(cached, cont) == want


def test_an_inplace_function_is_a_writer(cached, hf):
    """``F.relu(x, inplace=True)`` changes the prompt's KV: a plain request must not reuse
    it. (Its graph holds no assignment, and the backend once left it unsalted.)"""
    prompt = _prompt(6)
    plain = _solo(cached, _plain, prompt)
    edited = _solo(cached, _relu_inplace, prompt)
    assert edited != plain and edited == _relu_inplace(hf, prompt)
    _relu_inplace(cached, prompt)
    assert _plain(cached, prompt) == plain


@pytest.mark.parametrize("how", ["steer", "idiom"])
def test_reader_then_writer(cached, hf, how):
    prompt = _prompt(2)
    steered = _solo(cached, _steered, prompt, how)
    _plain(cached, prompt)
    assert _steered(cached, prompt, how) == steered
    # steering the prompt only: generated tokens see it through the prompt's KV alone
    want = _solo(cached, _prompt_steered, prompt, how)
    assert want != _solo(cached, _plain, prompt)
    assert want == _prompt_steered(hf, prompt, how)
    _plain(cached, prompt)
    assert _prompt_steered(cached, prompt, how) == want
    # the steered values at every step, prompt positions included
    _plain(cached, prompt)
    tokens, steps = _steered(cached, prompt, how, save=True)
    hf_tokens, hf_steps = _steered(hf, prompt, how, save=True)
    assert tokens == hf_tokens == steered
    assert [s.shape for s in steps] == [s.shape for s in hf_steps]
    assert steps[0].shape == (1, len(prompt), 64) and len(steps) == NEW
    assert max(rel_err(a, b) for a, b in zip(steps, hf_steps, strict=True)) < 1e-4
    # a steered prompt-forward capture after a plain one: the steered values, all positions
    _capture(cached, prompt)
    _same_capture(_capture(cached, prompt, how), _capture(hf, prompt, how))


@pytest.mark.parametrize("how", ["steer", "idiom"])
def test_capture_after_steer(cached, hf, how):
    prompt = _prompt(3)
    _empty(cached)
    _steered(cached, prompt, how)
    _capture(cached, prompt, how)                 # a steered capture writes its blocks too
    _same_capture(_capture(cached, prompt), _capture(hf, prompt))


def test_writer_then_other_writer(cached):
    prompt = _prompt(4)
    other = torch.randn(64, generator=torch.Generator().manual_seed(12)) * 4
    want = _solo(cached, _steered, prompt, "steer", other)
    assert want != _solo(cached, _steered, prompt, "steer")
    _steered(cached, prompt, "steer")
    assert _steered(cached, prompt, "steer", other) == want
    _steered(cached, prompt, "idiom")
    assert _steered(cached, prompt, "steer", other) == want


def _patched(lm, src: list[int], dst: list[int]):
    """Generate from ``dst`` with its layer-0 output at the prompt replaced by ``src``'s
    (another invoke's value): a write at step 0 that reads nothing there itself."""
    with lm.generate(max_new_tokens=6, ignore_eos=True) as tracer:
        with tracer.invoke(src):
            h = lm.model.layers[0].output
        with tracer.invoke(dst):
            lm.model.layers[0].output = h
            tracer.next()
            out = lm.model.layers[1].output.save()
    return tracer.result[1].tolist(), out


def test_a_patch_of_the_prompt_from_another_invoke(cached, hf):
    """The patched request runs its whole prompt itself, every time (it once read its own
    cached blocks on a rerun, then failed as 'split across forward chunks'), and a patch
    from another source prompt is another edit (the salt holds the patched-in value)."""
    a1, a2, b = _prompt(7), _prompt(8), _prompt(9)
    _empty(cached)
    for src in (a1, a1, a2):
        tokens, out = _patched(cached, src, b)
        want_tokens, want = _patched(hf, src, b)
        assert tokens == want_tokens
        assert rel_err(out, want) < 1e-4


@pytest.mark.parametrize("what", ["capture", "steer"])
def test_a_raw_request_served_from_the_cache_fails_with_what_to_set(cached, what):
    """The worker's own guard, for callers of the plugin that skip the library's rules: a
    request acting on the prompt whose first positions came from the cache never ran there
    (a capture came back with 14 of 110 rows, no error); it fails and says what to set."""
    from helpers import capture_graph, steer_graph

    from vinterp.backends.vllm.runs import GraphRun
    from vinterp_vllm.payload import outcomes_from_wire

    prompt = _prompt(10)
    _empty(cached)
    _plain(cached, prompt)                        # its blocks are in the cache now
    graph = capture_graph([prompt], ["model.layers.1"])[0] if what == "capture" else \
        steer_graph([prompt], [{"layer": 0, "vector": VEC}], max_new_tokens=2)
    run = GraphRun(graph, f"raw-{what}")
    (job,) = next(run.phases())
    _, params = run.request(job)
    params.skip_reading_prefix_cache = False      # as a caller without the rules sends it
    llm = cached._backend.llm
    out = llm.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)[0]
    assert out.num_cached_tokens == 3 * BLOCK
    outcome = outcomes_from_wire(llm.collective_rpc(
        "vinterp_drain", args=([job.payload.key],))[0])[job.payload.key]
    assert f"served this request's first {3 * BLOCK} prompt tokens" in outcome.error
    assert "skip_reading_prefix_cache=True" in outcome.error


def _step1_graph(prompt: list[int]):
    """``tracer.next()`` then ``layers[0].output[:] += v`` and a last-row save of layer 1:
    a general graph (no vectorized plan) acting on generated step 1 only."""
    from vinterp import ir
    from vinterp.ir.tensors import encode_tensor

    at = {"steps": {"start": 1, "stop": 2}}
    every = {"slice": [None, None, None]}
    return ir.load({
        "mode": "generate", "invokes": [{"prompts": [prompt]}],
        "generation": {"max_new_tokens": 6, "do_sample": False, "ignore_eos": True},
        "tensors": [encode_tensor(VEC).model_dump(mode="json")],
        "nodes": [
            {"id": 0, "op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}, **at},
            {"id": 1, "op": "getitem", "args": [{"ref": 0}, every], **at},
            {"id": 2, "op": "iadd", "args": [{"ref": 1}, {"tensor": 0}], **at},
            {"id": 3, "op": "setitem", "args": [{"ref": 0}, every, {"ref": 2}], **at},
            {"id": 4, "op": "read", "kwargs": {"module": "model.layers.1", "kind": "output"}, **at},
            {"id": 5, "op": "getitem", "args": [{"ref": 4}, {"tuple": [every, -1]}], **at},
            {"id": 6, "op": "save", "args": [{"ref": 5}], **at},
        ]})


def test_general_graph_on_generated_steps_with_a_cached_prompt(cached, hf):
    """It reads (its own salted) prompt blocks from the cache, which is right: it does not
    touch the prompt. The plugin used to fail it as 'split across forward chunks'."""
    prompt = _prompt(5)
    graph = _step1_graph(prompt)
    want = hf._backend.run(graph)
    _empty(cached)
    for _ in range(2):   # the second run finds the first one's prompt blocks
        got = cached._backend.run(graph)
        assert got.generated[0].tolist() == want.generated[0].tolist()
        assert rel_err(got.saves[6], want.saves[6]) < 1e-4
