"""The worker extension: hooks in vLLM's model that run every request's interventions.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=WORKER_EXTENSION)``) and the
caller reaches it with ``collective_rpc``:

* ``vinterp_install(model_type)`` — check that the hooks are in. They go in when vLLM loads
  the model, for engines built with ``additional_config={"vinterp": ...}`` (``vllm_patches``),
  so torch.compile traces them: each hook calls one custom op (``graph_op``) whose Python runs
  every step, compiled or eager.
* ``vinterp_drain(keys)`` — hand back and free the outcomes (saves, errors) of finished
  requests by the caller's own keys; ``vinterp_release(keys)`` frees without returning.
* ``vinterp_take_steps(keys)`` — the completed steps' captures of running requests
  (streaming responses carry them chunk by chunk).

Each forward: ``begin_step`` (from the model runner's ``_model_forward``) works out which rows
belong to which intervened request (``layout.py``), builds the vectorized groups per point
(``groups.py``) and starts the steps of general graphs; the op at each point applies them;
``end_step`` closes the steps. Requests without a
payload are never touched: their rows are bit-identical to plain vLLM.

Example::

    llm = LLM(**engine_kwargs(model_path))   # vinterp.backends.vllm.engine
    llm.collective_rpc("vinterp_install", args=("llama",))
    prompt, params = {"prompt_token_ids": ids}, SamplingParams(extra_args=payload.to_extra_args())
    isolate_prefix_cache(nodes, payload.graph_json, prompt, params)   # cache rules, see README
    llm.generate([prompt], [params])
    outcomes = outcomes_from_wire(llm.collective_rpc("vinterp_drain", args=(keys,))[0])
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vinterp_vllm.events import RowsEvent, _tensor, point_rows
from vinterp_vllm.finite import OutputWatch, finite_rows
from vinterp_vllm.groups import Group, TensorCache, build_groups
from vinterp_vllm.graph_op import PointIds, install_point_hooks
from vinterp_vllm.layout import RowSpan, batch_spans
from vinterp_vllm.logit_rows import batched_logits, wanted_rows
from vinterp_vllm.payload import Outcome, Payload, outcomes_to_wire, own_copies
from vinterp_vllm.points import LOGIT_VALUES, VllmPoint
from vinterp_vllm.request_state import ParsedGraphs, RequestState, Retention
from vinterp_vllm.tables import StepTables
from vinterp_vllm.wire import pack

WORKER_EXTENSION = "vinterp_vllm.worker.VinterpWorkerExtension"
log = logging.getLogger("vinterp_vllm")

#: HF point value kinds served at one vLLM hook, in the order the HF model produces them
_ORDER = {"residual": 0, "tensor": 0, "attn": 0, "norm": 0, "logits": 1, "model_output": 2}


class VinterpWorkerExtension:
    """Methods vLLM mixes into its worker; state lives on the worker instance."""

    # ------------------------------------------------------------------ RPC
    def vinterp_install(self, model_type: str) -> bool:
        """Check that the hooks are in (they go in when vLLM loads the model, see
        ``vllm_patches``); kept as an RPC so a client learns early when they are not."""
        if getattr(self, "_vinterp", None) is None:
            raise RuntimeError(
                "this vLLM engine was built without vinterp's hooks: build it with "
                "vinterp.backends.vllm.engine.engine_kwargs(...) (or pass additional_config="
                "{'vinterp': {}} and worker_extension_cls=WORKER_EXTENSION yourself); the "
                "hooks must be in place before vLLM compiles the model")
        return True

    def vinterp_drain(self, keys: list[str], as_bytes: bool = True,
                      steps: dict[str, int] | None = None) -> Any:
        """Outcomes of the given request keys (finished requests), freeing their state.

        ``steps``: per key, the request's number of generated tokens as its caller saw them;
        captures of later forwards are left out (see ``RequestState.finish``).

        Returned as bytes (``payload.outcomes_to_wire``; read them with
        ``outcomes_from_wire``), which cross vLLM's RPC transport unchanged. A caller in this
        process (an in-process engine core) may pass ``as_bytes=False`` and get the outcomes
        themselves, each tensor its own copy (``payload.own_copies``), without a round trip
        through bytes.
        """
        outcomes = self._vinterp.drain(keys, steps)
        return outcomes_to_wire(outcomes) if as_bytes else own_copies(outcomes)

    def vinterp_take_steps(self, keys: list[str],
                           before: dict[str, int] | None = None) -> bytes:
        """Captures of the steps already complete of still-running requests (streaming), as
        ``wire`` bytes of ``{key: {save id: [(step, value), ...]}}``; taken steps are left out
        of the final outcome. ``before``: per key, hand over only steps before that one
        (``RequestState.take_steps``)."""
        out = {}
        # (flags already on the host only: a stream's take must not stall the engine on a
        # step still running; the drain waits for the rest)
        self._vinterp.blame_tables()
        for key in keys:
            st = self._vinterp.by_key.get(key)
            if st is not None:
                taken = st.take_steps((before or {}).get(key))
                if taken:
                    out[key] = taken
        return pack(out)

    def vinterp_release(self, keys: list[str]) -> None:
        """Forget requests (aborted or no longer wanted)."""
        self._vinterp.drain(keys)

    def vinterp_stats(self) -> dict[str, Any]:
        """Counts of what the worker holds: ``states`` (per request key, live or undrained),
        ``tracked_ids`` (vLLM request ids seen), ``evicted`` (undrained states dropped),
        ``parsed_graphs`` (distinct request graphs parsed and kept, see ``ParsedGraphs``);
        ``compilation`` (vLLM's compilation mode, ``NONE`` when eager), ``cudagraph_mode``
        (the CUDA graph mode vLLM settled on, ``NONE`` on the CPU), ``points`` (hooked
        points) and ``point_calls`` (op calls so far: a compiled graph calls the op at every
        point of every step, an eager forward only where a request intervenes);
        ``graph_points`` (points the compiled graph calls the op from), ``eager_steps``
        (steps run eagerly because they needed another point), ``table_points`` and
        ``table_steps`` (points with the table op in the graph, steps served by the tables
        alone, see ``tables.py``), ``kv_clears`` (times the KV cache's inf/NaN values were
        zeroed after a request overflowed, see ``finite.OutputWatch``)."""
        h = self._vinterp
        cc = self.vllm_config.compilation_config  # type: ignore[attr-defined]
        mode, graphs = cc.mode, getattr(cc, "cudagraph_mode", None)
        return {"states": len(h.by_key), "tracked_ids": len(h.by_req),
                "evicted": h.retention.evicted, "max_undrained": h.retention.cap,
                "parsed_graphs": len(h.graphs), "compilation": getattr(mode, "name", str(mode)),
                "cudagraph_mode": getattr(graphs, "name", str(graphs)),
                "points": len(h.points), "point_calls": h.point_calls,
                "graph_points": len(h.in_graph), "eager_steps": h.eager_steps,
                "table_points": len(h.table_index), "table_steps": h.table_steps,
                "kv_clears": h.watch.cleared}

    def vinterp_set_max_undrained(self, cap: int) -> None:
        """Cap the states kept for finished requests nobody drained (see ``Retention``)."""
        self._vinterp.retention.cap = int(cap)


def attach_hooks(worker: Any) -> None:
    """Install the point hooks on a worker's freshly loaded model (``vllm_patches`` calls it
    from ``Worker.load_model``, before vLLM compiles the model)."""
    from vinterp.models.architectures import for_model_type
    from vinterp_vllm.vllm_patches import graph_points

    runner = worker.model_runner
    if not hasattr(runner, "input_batch"):
        raise RuntimeError("vinterp needs vLLM's V1 model runner; set "
                           "VLLM_USE_V2_MODEL_RUNNER=0")
    if getattr(runner.vllm_config, "speculative_config", None) is not None:
        from vinterp.backends.vllm.engine import SPECULATIVE_REFUSED

        raise ValueError(SPECULATIVE_REFUSED)
    from vinterp.backends.vllm.engine import refused_setting

    parallel = getattr(runner.vllm_config, "parallel_config", None)
    refusal = refused_setting(lambda name: getattr(
        runner.model_config if name == "enable_prompt_embeds" else parallel, name, None))
    if refusal:
        raise ValueError(refusal)
    arch = for_model_type(runner.model_config.hf_config.model_type)
    # the mapping that fits how this vLLM version built the model
    arch = arch.in_vllm(name for name, _ in runner.model.named_modules())
    hooks = _Hooks(runner, arch, graph_points(runner.vllm_config))
    worker._vinterp = hooks
    runner._vinterp_hooks = hooks


#: the outcome key of a request whose payload is malformed beyond reading its key
UNKEYED_PREFIX = "vllm-request:"

#: why two vLLM requests carrying one payload key fail (see ``_Hooks._state``)
PARALLEL_SAMPLING_REFUSED = (
    "two vLLM requests carry this intervention's key, and one state cannot tell their rows "
    "apart: either parallel sampling (SamplingParams n > 1), which gives every sample the "
    "same payload, or a key reused before its outcome was drained; send n requests with "
    "n=1, each with its own key, and drain a key (vinterp_drain) before reusing it "
    "(vinterp's library and server do both)")


class _Hooks:
    def __init__(self, runner: Any, arch: Any, graph_points: str = "all") -> None:
        self.runner = runner
        self.arch = arch
        self.graph_points = graph_points
        self.model = runner.get_model()
        self.dtype = next(self.model.parameters()).dtype
        self.hidden = int(runner.model_config.get_hidden_size())
        self.by_req: dict[str, RequestState | None] = {}
        #: per id in ``by_req``, the runner's request object it was resolved for: vLLM lets an
        #: id come back as a new request (aborted and resubmitted), which must not inherit
        #: the old one's state (or its lack of one)
        self.req_seen: dict[str, Any] = {}
        self.by_key: dict[str, RequestState] = {}
        self.retention = Retention()
        self.step_fast: dict[tuple[str, str], list[Group]] = {}   # vLLM hook → groups
        self.step_general: list[tuple[RequestState, RowSpan]] = []
        self.general_points: dict[tuple[str, str], list[tuple[RequestState, RowSpan,
                                                              VllmPoint]]] = {}
        self.active_hooks: set[tuple[str, str]] = set()
        self.mode_trace: dict[str, bool] = {}
        self.tensors = TensorCache()   # row indices and vector tables, shared across points
        self.graphs = ParsedGraphs(arch, self.dtype, self.hidden)  # requests' parsed graphs
        #: the hooked points, in op-index order: (vLLM module, side), and whether the point
        #: carries a fused layer's (hidden, residual) pair
        self.points: list[tuple[tuple[str, str], bool]] = []
        #: the hooked points the compiled graph calls the op from (see ``graph_points``)
        self.in_graph: set[tuple[str, str]] = set()
        self.point_calls = 0
        #: this step needs a point outside the graph: ``_model_forward`` runs it eagerly
        self.eager_step = False
        self.eager_steps = 0
        #: the active points the forward reached (each must be, see ``end_step``)
        self.reached: set[tuple[str, str]] = set()
        #: ``graph_points="tables"``, compiled: the tables and each table point's column
        self.tables: StepTables | None = None
        self.table_index: dict[tuple[str, str], int] = {}
        self.table_steps = 0
        #: this step's steering groups and which of their rows came out non-finite (read in
        #: end_step, so the forward needs no sync; see ``finite_rows``)
        self.step_nonfinite: list[tuple[tuple[str, str], Group, torch.Tensor]] = []
        #: this step's requests whose graphs edit, and the check of their output rows
        self.step_writers: list[tuple[RequestState, RowSpan]] = []
        self.watch = OutputWatch()
        self._install()

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        vm = self.arch.vllm
        n_layers = len(dict(self.model.named_modules())[vm.layers])
        self.points = [((vm.embed, "output"), False), ((vm.final_norm, "output"), False)]
        for i in range(n_layers):
            layer = f"{vm.layers}.{i}"
            for side in ("input", "output"):
                self.points += [((layer, side), vm.residual_pair),
                                ((f"{layer}.{vm.attn}", side), False),
                                ((f"{layer}.{vm.mlp}", side), False)]
        residual = {(vm.embed, "output"), (vm.final_norm, "output")} | {
            (f"{vm.layers}.{i}", "output") for i in range(n_layers)}
        mode = self.runner.vllm_config.compilation_config.mode
        compiled = getattr(mode, "name", str(mode)) != "NONE"
        # an eager engine has no graph: every point is served where it is
        self.in_graph = {key for key, _ in self.points
                         if self.graph_points == "all" or not compiled or key in residual}
        if compiled and self.graph_points == "tables":
            self.in_graph = set()
            keys = [key for key, _ in self.points if key in residual]
            self.table_index = {key: i for i, key in enumerate(keys)}
            self.tables = self._make_tables([f"{m}.{side}" for m, side in keys])
        ids = PointIds()
        ids.bind(self)
        install_point_hooks(self.model, [(m, side, pair) for (m, side), pair in self.points],
                            ids, lambda i: self.points[i][0] in self.active_hooks,
                            lambda i: self.points[i][0] in self.in_graph,
                            None if self.tables is None else self.tables.shared(),
                            lambda i: self.table_index.get(self.points[i][0]))

    def _make_tables(self, names: list[str]) -> StepTables:
        """The table path's device tables, sized from the engine's limits (rows: the most
        tokens one forward holds, CUDA-graph padding included) and the config's
        ``table_entries`` / ``capture_slots``."""
        from vinterp_vllm.vllm_patches import CONFIG_KEY

        cfg = self.runner.vllm_config
        ours = (cfg.additional_config or {}).get(CONFIG_KEY) or {}
        tokens = int(cfg.scheduler_config.max_num_batched_tokens)
        rows = max(tokens, int(cfg.compilation_config.max_cudagraph_capture_size or 0))
        return StepTables(points=len(names), names=names, rows=rows, hidden=self.hidden,
                          dtype=self.dtype, device=next(self.model.parameters()).device,
                          entries=int(ours.get("table_entries", 4096)),
                          slots=int(ours.get("capture_slots", tokens)))

    def at_point(self, index: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """The op's body: point ``index`` of this step, its tensors ``x`` (and ``y``, a fused
        layer's residual), written in place."""
        self.point_calls += 1
        key, pair = self.points[index]
        if key in self.active_hooks:
            self.reached.add(key)
            self._at_point(key, (x, y) if pair else x)

    # ------------------------------------------------------------------ per forward
    def _state(self, req_id: str) -> RequestState | None:
        req = self.runner.requests.get(req_id)
        if req_id in self.by_req and self.req_seen.get(req_id) is req:
            return self.by_req[req_id]
        error = None
        try:
            payload = None if req is None or req.sampling_params is None else \
                Payload.from_extra_args(req.sampling_params.extra_args)
        except Exception as exc:
            # a malformed payload fails this request alone (raising here, inside the
            # forward, would take the whole batch and the engine down); its outcome goes
            # under its key when that could be read, else under its vLLM request id
            key = getattr(exc, "key", None) or f"{UNKEYED_PREFIX}{req_id}"
            error = f"malformed vinterp payload: {exc}"
            payload = Payload(key=key, graph_json="")
            log.warning("vinterp: request %s: %s", req_id, error)
        st = None
        if payload is not None:
            st = self.by_key.get(payload.key)
            if st is None:
                st = RequestState(payload, self.graphs, error)
                st.req_id, st.vllm_request = req_id, req
                self.by_key[payload.key] = st
            elif st.req_id != req_id or st.vllm_request is not req:
                # vLLM's parallel sampling (n > 1) gives each sample the parent's extra_args,
                # and a caller may reuse a key it has not drained: one key, two requests'
                # rows, which one state cannot tell apart
                st.fail(f"{PARALLEL_SAMPLING_REFUSED} (key {payload.key!r})")
        self.by_req[req_id] = st
        self.req_seen[req_id] = req
        return st

    def _forget_ids(self, keep: Any) -> None:
        """Keep only the request ids ``keep(id, state)`` accepts in ``by_req``."""
        self.by_req = {r: s for r, s in self.by_req.items() if keep(r, s)}
        self.req_seen = {r: o for r, o in self.req_seen.items() if r in self.by_req}

    def begin_step(self, positions: torch.Tensor) -> None:
        """Map this step's rows to requests and prepare their interventions (called by the
        model runner's ``_model_forward`` with the step's absolute ``positions``)."""
        self.step_fast, self.step_general, self.general_points = {}, [], {}
        self.step_nonfinite, self.step_writers = [], []
        self.active_hooks = set()
        self.eager_step = False
        self.blame_tables()
        batch = self.runner.input_batch
        if len(self.by_req) > 8192:  # forget request ids vLLM no longer knows (plain ones)
            self._forget_ids(lambda r, s: r in self.runner.requests)
        self.retention.enforce(self.by_key, self.by_req, self.runner.requests)
        ids = [r for r in batch.req_ids[:batch.num_reqs] if r is not None]
        scheduled = set(ids)
        self.watch.resolve(self.dtype, scheduled=scheduled)
        self.watch.clear_if_gone(scheduled, self.runner.requests.__contains__,
                                 self.runner.kv_caches)
        wanted = {r for r in ids if self._state(r) is not None}
        if not wanted:
            if self.tables is not None:
                self.tables.clear()
            return
        spans = batch_spans(batch, positions, wanted)
        fast: dict[tuple[str, str, str], list[tuple[RequestState, RowSpan, list]]] = {}
        #: per point, what decides its grouping (see build_groups)
        layouts: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
        for i, span in enumerate(spans):
            st = self.by_req[span.req_id]
            if st is not None and st.writes and span.req_id not in self.watch.poisoned:
                self.step_writers.append((st, span))
            if st is None or st.failed:
                continue
            if st.prompt_lens and not st.check_prompt_len(span):   # (first span only)
                continue
            st.mask_cache = {}
            if st.plan is not None:
                if not st.check_prompt_start(span):
                    continue
                st.max_pos_seen = max(st.max_pos_seen, span.last_pos)
                for point, actions in st.fast_plan:
                    entries = fast.get(point)
                    if entries is None:
                        entries = fast[point] = []
                        layouts[point] = []
                    entries.append((st, span, actions))
                    layouts[point].append((i, actions.layout_id))
            elif st.begin(span):
                self.step_general.append((st, span))
                for p in st.points.values():
                    hook = (p.vllm_module, p.side)
                    self.general_points.setdefault(hook, []).append((st, span, p))
                    self.active_hooks.add(hook)
        if self.tables is not None and self._fill_tables(fast, positions.shape[0]):
            return
        device = positions.device
        self.tensors.next_step()
        for (vmod, side, value), entries in fast.items():
            try:
                groups = build_groups(entries, device, self.tensors,
                                      tuple(layouts[(vmod, side, value)]))
            except Exception as exc:  # never take the step down: fail these requests only
                for st, _, _ in entries:
                    st.fail(f"{type(exc).__name__}: {exc}")
                continue
            if groups:
                self.step_fast.setdefault((vmod, side), []).extend(
                    (value, g) for g in groups)  # type: ignore[arg-type]
                self.active_hooks.add((vmod, side))
        for lst in self.general_points.values():
            lst.sort(key=lambda e: _ORDER[e[2].value])
        self.eager_step = not self.active_hooks <= self.in_graph
        self.eager_steps += self.eager_step

    def after_forward(self, out: Any) -> None:
        """Check the model's output rows of the requests that edit (see ``OutputWatch``)."""
        if self.step_writers:
            device = out.device if isinstance(out, torch.Tensor) else None
            self.watch.watch(out, self.step_writers,
                             lambda rows: self.tensors.index(rows, device))

    def _fill_tables(self, fast: dict, n_rows: int) -> bool:
        """Serve this step from the tables when they can hold all of it (no general graph,
        nothing outside the residual points...); else reset them: the step runs eagerly."""
        tables = self.tables
        assert tables is not None
        plan = None if self.step_general or not fast else tables.plan(
            fast, self.table_index, n_rows)
        if plan is None:
            tables.clear()
            return False
        tables.fill(plan)
        self.table_steps += 1
        # the compiled graph serves these points; no Python hook runs this step
        self.active_hooks = set()
        return True

    def end_step(self) -> None:
        """Close the step's general graphs; the op does nothing until the next step opens
        (dummy and warm-up runs call the model outside ``_model_forward``).

        A point this step needed that the forward never reached (a compiled graph without it,
        had the eager fallback not run) fails its requests: an intervention must never
        silently not happen."""
        if self.tables is not None:
            self.tables.collect()
        self._fail_nonfinite()
        for key in self.active_hooks - self.reached:
            owners = {id(st): st for _, g in self.step_fast.get(key, ()) for st in g.owners}
            owners.update({id(st): st for st, _, _ in self.general_points.get(key, ())})
            for st in owners.values():
                st.fail(f"internal error: the forward never reached {key[0]}.{key[1]}, so "
                        "this request's intervention there did not run; please report it")
            log.error("vinterp: point %s was needed but never reached this step", key)
        for st, _ in self.step_general:
            st.end()
        self.reached = set()
        self.active_hooks = set()
        self.eager_step = False
        self.step_fast, self.step_general, self.general_points = {}, [], {}

    def _fail_nonfinite(self) -> None:
        """Fail the requests whose steering made a row inf or NaN this step (those rows kept
        their values, see ``finite_rows``): one sync for the whole step."""
        found, self.step_nonfinite = self.step_nonfinite, []
        for key, g, bad in found:
            if not bool(bad.any()):
                continue
            for k in sorted(set(g.table_index[bad].tolist())):
                g.owners[k].fail_nonfinite(f"{g.op} at {key[0]}", self.dtype)

    def _at_point(self, key: tuple[str, str], out: Any) -> None:
        """Run this step's work at point ``key``; ``out`` holds its tensors as a forward hook's
        output would (a fused layer's ``(hidden, residual)``, else the tensor)."""
        args: tuple = ()
        kwargs: dict = {}
        for value, g in self.step_fast.get(key, ()):  # type: ignore[misc]
            get, put = point_rows(value, args, kwargs, out, self.arch.vllm.batch_dim)
            try:
                if g.op == "capture":
                    vals = get(g.rows)
                    at = 0
                    for st, action, span, rows in g.captures:
                        st.add_capture(action, span, rows, vals[at:at + len(rows)])
                        at += len(rows)
                else:
                    rows = g.rows if g.span is None else g.span
                    x = get(rows)
                    new, bad = finite_rows(x, g.apply(x))
                    if bad is not None:
                        self.step_nonfinite.append((key, g, bad))
                    put(rows, new)
            except Exception as exc:  # e.g. a vector of the wrong hidden size
                msg = f"{type(exc).__name__}: {exc}"
                for st in g.owners:
                    st.fail(msg)
                log.warning("vinterp: vectorized %s at %s failed: %s", g.op, key, msg)
        # the final norm's point is also the logits' (and the model output's): its own events
        # run and write back first, so that logits are computed from the edited rows (and for
        # requests still running: one may fail in the first phase)
        for phase in (False, True):
            now = [(st, span, p) for st, span, p in self.general_points.get(key, ())
                   if (p.value in LOGIT_VALUES) == phase
                   and not (st.failed or st.runner is None or st.open_step is None)]
            logits = self._logits_each(now, out) if phase else {}
            for st, span, p in now:
                if st.failed:   # (its logits failed)
                    continue
                try:
                    ev = RowsEvent(p, span, st.open_step, args, kwargs, out, self.model,
                                   trace=st.payload.mode == "trace",
                                   logits=logits.get((id(st), p.key)))
                    st.runner.on_event(ev)
                    ev.write_back()
                except Exception as exc:
                    from vinterp.ir.errors import StopForward

                    if isinstance(exc, StopForward):
                        continue
                    st.fail(f"{type(exc).__name__}: {exc}" if not str(exc).startswith(
                        "intervention") else str(exc))

    def _logits_each(self, entries: list[tuple[RequestState, RowSpan, VllmPoint]],
                     out: Any) -> dict[tuple[int, tuple[str, str]], torch.Tensor]:
        """:meth:`_logits` for all ``entries`` at once; when that raises (e.g. one request's
        whole-prompt logits run the GPU out of memory), again one request at a time, failing
        only those whose own logits raise. An exception here would leave the op and fail the
        forward: every request of the batch, and the engine. The common path pays nothing."""
        try:
            return self._logits(entries, out)
        except Exception as exc:
            log.warning("vinterp: batched logits failed (%s: %s); retrying per request",
                        type(exc).__name__, exc)
        got: dict[tuple[int, tuple[str, str]], torch.Tensor] = {}
        for entry in entries:
            try:
                got.update(self._logits([entry], out))
            except Exception as exc:
                entry[0].fail(f"computing this request's logits failed: {type(exc).__name__}: "
                              f"{exc} (out of memory? read the logits at fewer positions, e.g. "
                              f"model.logits[:, -1])")
        return got

    def _logits(self, entries: list[tuple[RequestState, RowSpan, VllmPoint]],
                out: Any) -> dict[tuple[int, tuple[str, str]], torch.Tensor]:
        """The logits every request reading them at this point needs, in one call (see
        ``logit_rows``), by (``id`` of the request's state, HF point)."""
        wants = [(st, span, p, st.payload.mode == "trace") for st, span, p in entries
                 if p.value in LOGIT_VALUES]
        if not wants:
            return {}
        normed = _tensor(wants[0][2].value, (), {}, out, wants[0][2].batch_dim)
        rows = [(span, wanted_rows(span, trace, st.logit_rows.get(p.key)), trace)
                for st, span, p, trace in wants]
        return {(id(st), p.key): t for (st, _, p, _), t in
                zip(wants, batched_logits(self.model, normed, rows), strict=True)}

    # ------------------------------------------------------------------ results
    def blame_tables(self, *, wait: bool = False) -> None:
        """Fail the requests whose edits table steps flagged as inf/NaN (``StepTables.blame``;
        ``wait``: for the flags still on their way too)."""
        if self.tables is not None:
            self.tables.blame(self.dtype, wait=wait)

    def drain(self, keys: list[str], steps: dict[str, int] | None = None
              ) -> dict[str, Outcome]:
        self.blame_tables(wait=True)
        self.watch.resolve(self.dtype)
        out: dict[str, Outcome] = {}
        for key in keys:
            st = self.by_key.pop(key, None)
            if st is None:
                continue
            out[key] = st.finish((steps or {}).get(key))
        live = set(self.by_key.values())
        # plain request ids leave the cache once vLLM forgets them
        self._forget_ids(lambda r, s: s in live if s is not None else r in self.runner.requests)
        return out

