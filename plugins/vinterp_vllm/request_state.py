"""Worker-side state of one intervened request: its plan or graph runner, captures, errors.

A request runs either the vectorized plan (steering + captures, see ``fastpath.py``) or a
:class:`~vinterp.ir.interpreter.GraphRunner` on its own rows. Any failure is recorded here and
the request's interventions stop; the engine and other requests go on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from vinterp.ir import Graph, load, ops
from vinterp.ir.interpreter import GraphRunner
from vinterp.ir.run_state import RunState, snapshot
from vinterp.ir.tensors import decode_tensor
from vinterp.models.architectures import Architecture
from vinterp_vllm.actions import Action, ActionList
from vinterp_vllm.calls import call_target
from vinterp_vllm.fastpath import plan_for
from vinterp_vllm.layout import RowSpan
from vinterp_vllm.logit_rows import read_positions
from vinterp_vllm.payload import Outcome, Payload
from vinterp_vllm.points import LOGIT_VALUES, VllmPoint, resolve_point


def saved_bytes(v: Any) -> int:
    """The bytes of the tensors in ``v`` (a save's value, a list of steps, a dict of saves):
    what counts against a payload's ``capture_cap`` here, and against a whole request's on
    the client side (``vinterp.backends.vllm.runs``, the server)."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(saved_bytes(x) for x in v)
    if isinstance(v, dict):
        return sum(saved_bytes(x) for x in v.values())
    return 0


@dataclass(frozen=True)
class Parsed:
    """A request graph as the worker runs it: validated, its points resolved, its vectorized
    plan (``None``: the general path). Shared by every request that sends the same text."""

    graph: Graph
    points: dict[tuple[str, str], VllmPoint]
    plan: dict[tuple[str, str], list[Action]] | None
    #: logits points: the positions the graph can observe (``None``: all), see ``logit_rows``
    logit_rows: dict[tuple[str, str], frozenset[int] | None]
    #: the plan by the worker's point key ``(vLLM module, side, value kind)``
    fast_plan: tuple[tuple[tuple[str, str, str], ActionList], ...] = ()
    #: whether the graph may change activations (``ops.writes``): its output is watched
    writes: bool = False
    #: whether it reads or edits the prompt's forward (it needs every prompt position run)
    acts_on_prompt: bool = False


class ParsedGraphs:
    """Parsed request graphs by their IR text, least recently used dropped past ``size``.

    A batch of prompts run through the same intervention (a loop of invokes) sends the same
    text for each (the client numbers each request's nodes from 0); parsing and planning it
    once instead of per request took a 256-prompt capture's worker overhead from ~1.5 ms to
    microseconds per request. Graphs that fail to parse are not kept: each request fails alone.
    """

    def __init__(self, arch: Architecture, dtype: torch.dtype, hidden: int,
                 size: int = 512) -> None:
        self.arch, self.dtype, self.hidden, self.size = arch, dtype, hidden, size
        self._lru: OrderedDict[tuple[str, int, bool], Parsed] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, payload: Payload) -> Parsed:
        # values handed to other invokes come from the graph runner's environment
        no_fast = bool(payload.exports or payload.imports)
        key = (payload.graph_json, payload.invoke, no_fast)
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit
        parsed = self._parse(payload.graph_json, payload.invoke, no_fast)
        self._lru[key] = parsed
        if len(self._lru) > self.size:
            self._lru.popitem(last=False)
        return parsed

    def _parse(self, text: str, invoke: int, no_fast: bool) -> Parsed:
        graph = load(text)
        points: dict[tuple[str, str], VllmPoint] = {}
        for n in graph.nodes:
            if n.op in ("read", "write") and n.invoke in (invoke, -1):
                key = (n.kwargs["module"], n.kwargs["kind"])
                if key not in points:
                    points[key] = resolve_point(self.arch, *key)
            elif n.op == "call_module" and n.invoke in (invoke, -1):
                call_target(self.arch, n.kwargs["module"])   # refuses other modules
        kinds = {k: p.value for k, p in points.items()}
        plan = None if no_fast else plan_for(graph, invoke, kinds, self.dtype)
        for actions in (plan or {}).values():
            for a in actions:
                if a.vector is not None and a.vector.shape[-1] != self.hidden:
                    raise ValueError(
                        f"node {a.node.id} ({a.op}): vector has {a.vector.shape[-1]} "
                        f"entries but the model's hidden size is {self.hidden}")
        logits = {k: read_positions(graph, invoke, k, p.value) for k, p in points.items()
                  if p.value in LOGIT_VALUES}
        fast = tuple(((points[k].vllm_module, points[k].side, points[k].value), actions)
                     for k, actions in (plan or {}).items())
        mine = [n for n in graph.nodes if n.invoke in (invoke, -1)]
        return Parsed(graph, points, plan, logits, fast, ops.writes(mine),
                      ops.acts_on_prompt(mine))


class RequestState:
    """Everything the worker keeps for one request until the caller drains it."""

    def __init__(self, payload: Payload, graphs: ParsedGraphs | None,
                 error: str | None = None) -> None:
        """``error``: the request is refused before anything runs (a malformed payload, see
        ``worker._Hooks._state``); ``graphs`` is then not consulted."""
        self.payload = payload
        self.outcome = Outcome()
        self.mask_cache: dict[tuple[Any, ...], list[int]] = {}
        self.plan: dict[tuple[str, str], list[Action]] | None = None
        self.fast_plan: tuple[tuple[tuple[str, str, str], ActionList], ...] = ()
        self.runner: GraphRunner | None = None
        self.points: dict[tuple[str, str], VllmPoint] = {}
        self.logit_rows: dict[tuple[str, str], frozenset[int] | None] = {}
        self.captured_bytes = 0
        #: general-path saves already counted in ``captured_bytes``: save node -> how many
        self._saves_counted: dict[int, int] = {}
        # fast captures: save id -> step -> [(first position, rows tensor)]
        self._chunks: dict[int, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        self._next_pos: dict[int, int] = {}
        self._prompt_len = 1 << 62   # known once rows are captured
        self.max_pos_seen = -1
        self.first_step = 0
        self.open_step: int | None = None
        self.writes = self.acts_on_prompt = False
        self.req_id: str | None = None   # the vLLM request it belongs to (set by the worker)
        self.vllm_request: Any = None     # and the model runner's object for it
        #: the prompt lengths the graph's invoke has (one per prompt); checked against vLLM's
        #: on the request's first span, then emptied (see :meth:`check_prompt_len`)
        self.prompt_lens: frozenset[int] = frozenset()
        if error is not None or graphs is None:
            self.fail(error or "no graph")
            return
        try:
            parsed = graphs.get(payload)
            self.graph, self.points, self.plan = parsed.graph, parsed.points, parsed.plan
            self.fast_plan = parsed.fast_plan
            self.writes, self.acts_on_prompt = parsed.writes, parsed.acts_on_prompt
            self.logit_rows = parsed.logit_rows
            invokes = self.graph.invokes
            if 0 <= payload.invoke < len(invokes):
                self.prompt_lens = frozenset(len(p) for p in invokes[payload.invoke].prompts)
            if self.plan is None:
                state = RunState()
                for nid, td in payload.imports.items():
                    state.env[int(nid)] = decode_tensor(_tensor_data(td))
                    state.env_step[int(nid)] = -1
                self.runner = GraphRunner(self.graph, state=state,
                                          active_invokes=[payload.invoke])
                # a graph acting on generated steps only never needs the prompt's rows, so
                # its prompt may come in chunks or (its own cached KV) not at all
                self.first_step = min((n.steps.start for n in self.graph.nodes), default=0)
        except Exception as exc:  # a bad graph fails this request only
            self.fail(f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ status
    @property
    def failed(self) -> bool:
        return self.outcome.error is not None

    def fail(self, message: str, *, retry_alone: bool = False, too_large: bool = False) -> None:
        if self.outcome.error is None:
            self.outcome.error = message
            self.outcome.retry_alone = retry_alone
            self.outcome.too_large = too_large
        self.runner = None
        self.plan = None

    def fail_nonfinite(self, what: str, dtype: torch.dtype) -> None:
        """Fail because ``what`` (an op at a point) made this request's rows inf or NaN; the
        rows kept their values (see ``finite.py``)."""
        self.fail(f"{what} made this request's activations inf or NaN (a vector or scale too "
                  f"large for {dtype}?); the request was stopped and its rows kept their "
                  f"values there, so no other request can see them")

    def _add_bytes(self, n: int) -> None:
        self.captured_bytes += n
        if self.captured_bytes > self.payload.capture_cap:
            self.fail(f"captures exceeded this request's cap of {self.payload.capture_cap} "
                      f"bytes; save fewer points, positions (e.g. x[:, -1]) or steps, or ask "
                      f"for a larger cap (capture_cap= in the library; a server key's "
                      f"capture_bytes limit)", too_large=True)

    # ------------------------------------------------------------------ fast captures
    def add_capture(self, action: Action, span: RowSpan, rows: list[int],
                    values: torch.Tensor) -> None:
        """Record captured rows (copies); rows already captured (recomputation) are skipped."""
        sid = action.node.id
        nxt = self._next_pos.get(sid, 0)
        per_step = self._chunks.setdefault(sid, {})
        first, start, prompt_len = span.first_pos, span.start, span.prompt_len
        # rows are consecutive positions within one step except across the prompt's end
        kept = 0
        for i, r in enumerate(rows):
            pos = first + (r - start)
            if pos < nxt:
                continue
            kept += 1
            step = pos - prompt_len + 1 if pos >= prompt_len else 0
            chunk = per_step.get(step)
            if chunk is None:
                chunk = per_step[step] = []
            chunk.append((pos, values[i]))
            nxt = pos + 1
        self._prompt_len = prompt_len
        self._next_pos[sid] = nxt
        if kept:   # (recomputed rows were charged when first captured)
            self._add_bytes(kept * values[0].numel() * values.element_size())

    def take_steps(self, before: int | None = None) -> dict[int, list[tuple[int, Any]]]:
        """Fast captures of the steps already complete, as ``save id -> [(step, value)]``,
        handed over now (streaming) and so left out of :meth:`finish`. A decode step is one
        row, complete when seen; the prompt's step once its last position is captured (or a
        generated row follows). General graphs hand everything over at the end.

        ``before``: hand over only earlier steps. A caller that has seen ``k`` generated
        tokens passes ``k``: step ``k`` is the forward over token ``k``, which only counts
        if that token is not the last (vLLM may run it before noticing a stop string)."""
        out: dict[int, list[tuple[int, Any]]] = {}
        if self.plan is None or self.failed:
            return out
        for point, actions in self.plan.items():
            if self.points[point].value == "attn":
                continue
            for a in actions:
                steps = self._chunks.get(a.node.id)
                if a.op != "capture" or not steps:
                    continue
                done = [s for s in sorted(steps) if (s > 0 or len(steps) > 1
                        or self._next_pos.get(a.node.id, 0) >= self._prompt_len)
                        and (before is None or s < before)]
                if done:
                    out[a.node.id] = [(s, a.assemble(s, steps.pop(s))) for s in done]
        return out

    def fast_saves(self, before_step: int | None = None) -> dict[int, Any]:
        out: dict[int, Any] = {}
        assert self.plan is not None
        for point, actions in self.plan.items():
            wrap = self.points[point].value == "attn"  # HF attention returns (out, weights)
            for a in actions:
                if a.op != "capture":
                    continue
                steps = self._chunks.get(a.node.id, {})
                vals: list[Any] = [a.assemble(s, steps[s]) for s in sorted(steps)
                                   if before_step is None or s < before_step]
                if wrap:
                    vals = [(v, None) for v in vals]
                multi = a.node.steps.stop is None or a.node.steps.stop - a.node.steps.start > 1
                if multi:
                    out[a.node.id] = vals
                elif vals:
                    out[a.node.id] = vals[-1]
        return out

    def check_prompt_len(self, span: RowSpan) -> bool:
        """False (and the request failed) when vLLM's prompt is not as long as the graph's:
        positions (``x[:, -1]``, ``positions=[...]``) resolve against the graph's prompt, so
        the wrong rows would be read or edited, silently. vinterp's library and server send
        the graph's own tokens; a direct caller whose chat template or BOS token changed
        them would not. Checked once, on the request's first span."""
        lens, self.prompt_lens = self.prompt_lens, frozenset()
        if not lens or span.prompt_len in lens:
            return True
        want = " or ".join(str(n) for n in sorted(lens))
        self.fail(f"vLLM runs this request with a {span.prompt_len}-token prompt but its "
                  f"graph's invoke {self.payload.invoke} has a {want}-token prompt, so its "
                  f"positions would pick the wrong rows; send the graph's own prompt tokens as "
                  f"prompt_token_ids (a chat template or an added BOS token changes them)")
        return False

    def check_prompt_start(self, span: RowSpan) -> bool:
        """False (and the request failed) when its first rows start past position 0 although
        its graph acts on the prompt: vLLM served the positions before from its prefix
        cache, where nothing of this request ran (no capture, no edit). vinterp's library and
        server never send such requests (``isolate_prefix_cache``); a caller of the plugin's
        own must do as they do."""
        if self.max_pos_seen >= 0 or span.first_pos == 0 or not self.acts_on_prompt:
            return True
        self.fail(f"vLLM's prefix cache served this request's first {span.first_pos} prompt "
                  f"tokens, so its intervention never ran on them; send a request that "
                  f"reads or edits the prompt with SamplingParams(skip_reading_prefix_cache="
                  f"True), and one that edits with a cache_salt of its own (see vinterp."
                  f"backends.vllm.requests.isolate_prefix_cache)")
        return False

    # ------------------------------------------------------------------ general path
    def begin(self, span: RowSpan) -> bool:
        """Start this request's step for the general runner; False if nothing to run."""
        runner = self.runner
        if runner is None or not self.check_prompt_start(span):
            return False
        if span.first_pos <= self.max_pos_seen:
            # vLLM preempted the request and now recomputes positions this graph already ran
            # on: replaying would apply its writes twice and its step state is past them. The
            # client reruns the request alone (retry_alone), where it is not preempted.
            self.fail("the request was preempted and recomputed by vLLM (KV cache full); "
                      "general interventions cannot be replayed mid-request. Give the engine "
                      "more KV cache (kv_cache_memory_bytes) or fewer concurrent requests "
                      "(max_num_seqs)", retry_alone=True)
            return False
        self.max_pos_seen = span.last_pos
        if span.first_pos < span.prompt_len and self.first_step > 0:
            return False
        if span.first_pos < span.prompt_len:
            if span.first_pos != 0 or span.n < span.prompt_len:
                self.fail(f"the prompt ({span.prompt_len} tokens) was split across forward "
                          f"chunks by chunked prefill; this graph indexes or mixes positions and "
                          f"needs the whole prompt in one forward", retry_alone=True)
                return False
            step = 0
        else:
            step = span.first_pos - span.prompt_len + 1
        if step >= runner.max_step:
            return False
        try:
            runner.begin_step(step)
        except Exception as exc:
            self.fail(str(exc))
            return False
        self.open_step = step
        return True

    def end(self) -> None:
        """End the open step of the general runner; record exports."""
        runner = self.runner
        self.open_step = None
        if runner is None:
            return
        try:
            runner.end_step()
        except Exception as exc:
            self.fail(str(exc))
            return
        self._count_new_saves(runner)
        if self.failed:
            return
        for nid in self.payload.exports:
            if nid in runner.state.env:
                self.outcome.exports[nid] = snapshot(runner.state.env[nid])

    def _count_new_saves(self, runner: GraphRunner) -> None:
        """Charge the saves this step made against the cap as they are made, as the fast
        path does: a generation saving a large value every step must fail once past its cap,
        not hold worker (GPU) memory without bound until it is drained."""
        for nid, saved in runner.state.saves.items():
            done = self._saves_counted.get(nid, 0)
            if len(saved) > done:
                self._add_bytes(sum(saved_bytes(s.snapshot) for s in saved[done:]))
                self._saves_counted[nid] = len(saved)

    def finish(self, steps: int | None = None) -> Outcome:
        """The outcome to hand back (saves assembled).

        ``steps``: how many forwards of the request count, its number of generated tokens
        (the forward over the last one is not part of the generation). vLLM notices a stop
        string in its front end, after the engine may have run that forward: its captures
        and saves are left out. (The prompt's forward always counts.)"""
        if steps is not None:
            steps = max(steps, 1)
        if not self.failed:
            try:
                if self.plan is not None:
                    self.outcome.saves = self.fast_saves(steps)
                elif self.runner is not None:   # (its saves were counted step by step)
                    self.outcome.saves = self.runner.results(steps)
            except Exception as exc:
                self.fail(f"{type(exc).__name__}: {exc}")
        if self.failed:
            self.outcome.saves = {}
        return self.outcome


def _tensor_data(td: Any) -> Any:
    from vinterp.ir.schema import TensorData

    return td if isinstance(td, TensorData) else TensorData.model_validate(td)


#: default cap on states kept for finished requests whose outcome nobody drained
DEFAULT_MAX_UNDRAINED = 1024


class Retention:
    """Bounds worker memory held for finished requests that were never drained.

    A request's state stays after vLLM finishes it, until the caller drains its outcome. A
    caller that never does (aborted the request, crashed, forgot) would leak it; vLLM does not
    tell the worker whether a request finished or was aborted. So once more than ``cap`` states
    belong to requests vLLM no longer runs, the oldest of those are dropped (a later drain of
    them reports nothing). Live requests are never dropped. The check is O(states) and runs
    only while more than ``cap`` states exist.
    """

    def __init__(self, cap: int = DEFAULT_MAX_UNDRAINED) -> None:
        self.cap = cap
        self.evicted = 0

    def enforce(self, by_key: dict[str, RequestState],
                by_req: dict[str, RequestState | None], live_req_ids: Any) -> list[str]:
        """Drop the oldest finished states beyond the cap; returns the dropped keys."""
        if len(by_key) <= self.cap:
            return []
        live = {id(s) for r, s in by_req.items() if s is not None and r in live_req_ids}
        finished = [k for k, s in by_key.items() if id(s) not in live]  # oldest first
        drop = finished[:max(0, len(finished) - self.cap)]
        for k in drop:
            del by_key[k]
        self.evicted += len(drop)
        return drop
