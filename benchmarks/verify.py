"""What every timed repetition must have produced, checked by the driver before it counts.

A handler returns, next to its time, a ``verify`` dict of what it measured in that repetition:

- ``new_tokens``: tokens each request really generated (from the outputs, not the request);
- ``changed`` / ``compared``: of the first ``compared`` requests, how many generated other
  tokens than the same requests unsteered (an untimed reference run of that system); most
  of them must;
- ``captures``: ``{"count": n, "bad_shapes": [...]}``: saved tensors, and those whose shape is
  not ``[1, tokens of its prompt, hidden]`` (full) or ``[1, hidden]`` (last token).

:func:`check` compares them with what the workload asked for; a repetition that fails is not
recorded (its task is listed in ``skipped`` with the reason), so a row's speed is never that of
a run that silently did less work.

Example::

    >>> check({"workload": "concurrency", "case": "c1"}, "vinterp_vllm",
    ...       {"tokens": 64, "verify": {"new_tokens": [64], "changed": 1, "compared": 1}},
    ...       requested=[64], capture_count=None)
"""

from __future__ import annotations

from typing import Any

from benchmarks.workloads import WorkloadConfig

#: requests of each generation task compared with an unsteered run (untimed)
COMPARED = 8
#: systems whose handlers report ``verify`` (nnsight's too; plain vLLM steers nothing)
PLAIN = frozenset({"vllm_eager", "vllm_compiled"})


def requested_tokens(cfg: WorkloadConfig, task: dict[str, Any]) -> list[int] | None:
    """Tokens each request of ``task`` asks for (None: the task generates nothing)."""
    w, case = task["workload"], task["case"]
    n_new = cfg.sizes.gen_new_tokens
    if w == "steer_generate":
        n = cfg.sizes.serial_subset if task.get("variant") == "one_at_a_time" \
            else len(cfg.gen_prompts)
        return [n_new] * n
    if w == "concurrency":
        return [n_new] * int(case[1:])
    if w == "many_users":
        users = cfg.users[: cfg.sizes.serial_subset] \
            if task.get("variant") == "one_at_a_time" else cfg.users
        return [u["max_tokens"] for u in users]
    return None


def expected_captures(cfg: WorkloadConfig, task: dict[str, Any]) -> int | None:
    """Saved tensors a capture task must return (None: not a capture task)."""
    if task["workload"] != "capture" or task["case"] == "prefill":
        return None
    per_prompt = cfg.num_layers if task["case"] == "last_all_layers" \
        else len(cfg.sizes.capture_full_layers)
    return per_prompt * len(cfg.capture_prompts)


def steered(system: str, task: dict[str, Any]) -> bool:
    """Whether ``task`` on ``system`` steers (so its tokens must differ from unsteered)."""
    if system in PLAIN:
        return False
    w = task["workload"]
    return w in ("concurrency", "many_users") or (w == "steer_generate"
                                                  and task["case"] != "none")


def check(task: dict[str, Any], system: str, result: dict[str, Any], *,
          requested: list[int] | None, capture_count: int | None) -> str | None:
    """Why this repetition's output is not what was asked for, or None when it is."""
    v = result.get("verify")
    if requested is None and capture_count is None:
        return None
    if not isinstance(v, dict):
        return "the handler reported nothing to verify"
    if requested is not None:
        got = v.get("new_tokens")
        if got is None or len(got) != len(requested):
            return f"{0 if got is None else len(got)} requests came back, {len(requested)} sent"
        short = [i for i, (g, r) in enumerate(zip(got, requested, strict=True)) if g < r]
        if short:
            return (f"{len(short)} requests generated fewer tokens than asked (first: request "
                    f"{short[0]}, {got[short[0]]} of {requested[short[0]]})")
        counted = sum(min(g, r) for g, r in zip(got, requested, strict=True))
        if result.get("tokens") is not None and result["tokens"] != counted:
            return f"reported {result['tokens']} tokens, measured {counted}"
        if steered(system, task):
            if not v.get("compared"):
                return "steered tokens were not compared with an unsteered run"
            if not v.get("changed"):
                return (f"steering changed no token: all {v['compared']} requests compared "
                        f"equal the unsteered run")
            if 2 * v["changed"] <= v["compared"]:
                # vectors this strong change most requests (7-8 of 8 on file); a few changed
                # ones can come from batching noise alone, or from one request in the wrong
                # place while the others went unsteered
                return (f"steering changed only {v['changed']} of {v['compared']} requests "
                        f"compared with the unsteered run (a majority must change)")
    if capture_count is not None:
        cap = v.get("captures") or {}
        if cap.get("count") != capture_count:
            return f"{cap.get('count')} captures, {capture_count} expected"
        if cap.get("bad_shapes"):
            return f"captures of the wrong shape: {cap['bad_shapes'][:3]}"
    return None


def changed(got: list[list[int]], reference: list[list[int]]) -> dict[str, int]:
    """``changed``/``compared`` of generated id lists against an unsteered reference
    (compared over the shorter length of each pair)."""
    n = min(len(got), len(reference))
    diff = sum(1 for a, b in zip(got[:n], reference[:n], strict=True)
               if a[:min(len(a), len(b))] != b[:min(len(a), len(b))])
    return {"changed": diff, "compared": n}


def capture_shapes(saved: list[Any], prompt_lens: list[int], per_prompt: int, hidden: int,
                   last: bool, padded: bool = False) -> dict[str, Any]:
    """``captures`` for ``saved`` (prompt-major, ``per_prompt`` tensors each); ``padded``:
    full-sequence values are left-padded to the batch's longest prompt (nnsight's invokes)."""
    bad = []
    for k, s in enumerate(saved):
        n = prompt_lens[k // per_prompt] if k // per_prompt < len(prompt_lens) else -1
        if padded:
            n = max(prompt_lens)
        want = (1, hidden) if last else (1, n, hidden)
        shape = tuple(getattr(s, "shape", ()))
        if shape != want:
            bad.append(f"#{k}: {list(shape)} != {list(want)}")
    return {"count": len(saved), "bad_shapes": bad}
