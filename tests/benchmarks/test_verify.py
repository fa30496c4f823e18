"""What the driver checks in every timed repetition (benchmarks/verify.py), on hand-made
results, and the rotation of the system order."""

from __future__ import annotations

import torch

from benchmarks import verify
from benchmarks.runner import rotated
from benchmarks.workloads import SizeConfig, build_config


def cfg():
    return build_config("/model", num_layers=3, hidden_size=8, sizes=SizeConfig.quick(),
                        count_tokens=lambda text: len(text.split()))


def test_generation_needs_measured_counts_and_steering_that_changes_tokens() -> None:
    c = cfg()
    task = {"workload": "steer_generate", "case": "distinct_1layer", "variant": "batched"}
    want = verify.requested_tokens(c, task)
    assert want == [c.sizes.gen_new_tokens] * len(c.gen_prompts)
    good = {"tokens": sum(want), "verify": {"new_tokens": want, "changed": 7, "compared": 8}}

    def why(result, system="vinterp_vllm", t=task):
        return verify.check(t, system, result, requested=verify.requested_tokens(c, t),
                            capture_count=verify.expected_captures(c, t))

    assert why(good) is None
    assert "nothing to verify" in why({"tokens": sum(want)})
    short = [*want[:-1], want[-1] - 1]
    assert "fewer tokens than asked" in why(dict(good, verify=dict(good["verify"],
                                                                   new_tokens=short)))
    assert "requests came back" in why(dict(good, verify=dict(good["verify"],
                                                              new_tokens=want[:-1])))
    assert "reported" in why(dict(good, tokens=sum(want) + 1))
    same = dict(good, verify=dict(good["verify"], changed=0))
    assert "steering changed no token" in why(same)
    few = dict(good, verify=dict(good["verify"], changed=4))   # half is not a majority
    assert "changed only 4 of 8 requests" in why(few)
    # unsteered runs and plain vLLM need no change
    none = dict(task, case="none")
    assert why(dict(same, verify={"new_tokens": want}), t=none) is None
    assert why({"tokens": sum(want), "verify": {"new_tokens": want}}, "vllm_eager") is None


def test_batches_generated_to_the_longest_count_only_asked_tokens() -> None:
    c = cfg()
    task = {"workload": "many_users", "case": "steered", "variant": "invokes_to_longest"}
    want = verify.requested_tokens(c, task)
    longest = [max(want)] * len(want)
    ok = {"tokens": sum(want), "verify": {"new_tokens": longest, "changed": 8, "compared": 8}}
    assert verify.check(task, "nnsight", ok, requested=want, capture_count=None) is None
    bad = dict(ok, tokens=sum(longest))
    assert "reported" in verify.check(task, "nnsight", bad, requested=want, capture_count=None)


def test_captures_count_and_shapes() -> None:
    c = cfg()
    task = {"workload": "capture", "case": "last_all_layers", "variant": "batched"}
    n = verify.expected_captures(c, task)
    assert n == 3 * len(c.capture_prompts)
    lens = [4] * len(c.capture_prompts)
    saved = [torch.zeros(1, 8)] * n
    cap = verify.capture_shapes(saved, lens, 3, 8, last=True)
    assert verify.check(task, "vinterp_hf", {"verify": {"captures": cap}}, requested=None,
                        capture_count=n) is None
    cap = verify.capture_shapes(saved[:-1], lens, 3, 8, last=True)
    assert "captures," in verify.check(task, "vinterp_hf", {"verify": {"captures": cap}},
                                       requested=None, capture_count=n)
    full = verify.capture_shapes([torch.zeros(1, 4, 8), torch.zeros(1, 3, 8)], [4], 2, 8,
                                 last=False)
    assert full["bad_shapes"] == ["#1: [1, 3, 8] != [1, 4, 8]"]
    # nnsight's invokes: every value padded to the batch's longest prompt
    padded = verify.capture_shapes([torch.zeros(1, 5, 8)] * 2, [5, 3], 1, 8, last=False,
                                   padded=True)
    assert padded == {"count": 2, "bad_shapes": []}
    assert verify.expected_captures(c, dict(task, case="prefill")) is None


def test_changed_compares_each_pair_over_its_shorter_length() -> None:
    assert verify.changed([[1, 2, 3], [4, 5]], [[1, 2], [4, 6, 7]]) == \
        {"changed": 1, "compared": 2}


def test_rotation_gives_every_system_every_place() -> None:
    systems = ["a", "b", "c"]
    orders = [rotated(systems, rep) for rep in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {o[0] for o in orders} == set(systems)
    assert rotated([], 2) == []
