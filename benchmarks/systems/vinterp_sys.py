"""vinterp, on the HF backend or on the vLLM backend (plugin inside the continuous batch).

The same user code for both backends, written against vinterp's public API only
(``LanguageModel``, ``trace``/``generate``, ``tracer.invoke``, ``tracer.all()``, ``.steer``,
``.save()``): the whole batch is one trace, which the backend runs as one batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from benchmarks import verify
from benchmarks.systems.base import NotAvailable, System, Task, Timer
from benchmarks.workloads import (
    CLEAN_PROMPT,
    CORRUPT_PROMPT,
    IDIOM_CASES,
    STEER_CASES,
    TARGET_TOKEN,
    WorkloadConfig,
    device_map,
    layer_vectors,
    vectors,
)


class VinterpSystem(System):
    def __init__(self, backend: str, enforce_eager: bool = False,
                 graph_points: str | None = None) -> None:
        self.backend = backend
        self.enforce_eager = enforce_eager
        self.graph_points = graph_points   # vinterp's default for the device when None

    def setup(self, cfg: WorkloadConfig) -> dict[str, Any]:
        import transformers

        import vinterp
        from vinterp import language_model

        if self.backend == "vllm":
            try:
                import vinterp.backends.vllm  # noqa: F401
            except ImportError as e:
                raise NotAvailable(f"vinterp's vLLM backend is not there yet ({e})") from e
        self.cfg = cfg
        self.dtype = getattr(torch, cfg.dtype)
        kwargs: dict[str, Any] = device_map(cfg) if self.backend == "hf" else {}
        if self.backend == "vllm":
            from benchmarks.systems.vllm_common import engine_kwargs

            # The engine settings plain vLLM runs with (compiled unless enforce_eager).
            kwargs = {k: v for k, v in engine_kwargs(cfg, self.enforce_eager).items()
                      if k not in ("model", "dtype")}
            if self.graph_points:
                kwargs["additional_config"] = {"vinterp": {"graph_points": self.graph_points}}
        with Timer() as t:
            self.m = language_model.LanguageModel(cfg.model_path, backend=self.backend,
                                                  dtype=self.dtype, **kwargs)
        versions = {"vinterp": vinterp.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__}
        if self.backend == "vllm":
            import vllm

            versions["vllm"] = vllm.__version__
        # Does invoke take per-request generation settings (mixed max_tokens in one batch)?
        # (``tracer.invoke(prompt, **generation)``; older versions took the prompt only)
        from vinterp.tracing.tracer import Tracer

        params = inspect.signature(Tracer.invoke).parameters.values()
        self.per_invoke_max = any(p.kind is p.VAR_KEYWORD or p.name == "max_new_tokens"
                                  for p in params)
        return {"load_s": t.seconds, "dtype": cfg.dtype, "backend": self.backend,
                "enforce_eager": self.enforce_eager, "graph_points": self.graph_points,
                "versions": versions}

    def tasks(self) -> list[Task]:
        t = [Task("steer_generate", c) for c in (*STEER_CASES, *IDIOM_CASES)]
        t += self.levels(self.cfg)
        t += [Task("capture", c) for c in ("last_all_layers", "full_4layers")]
        t += [Task("patch_sweep", "grid", "one_batch", "seconds"),
              Task("patch_sweep", "grid", "nnsight_idiom", "seconds")]
        t += [Task("many_users", "steered",
                   "own_max_tokens" if self.per_invoke_max else "invokes_to_longest")]
        if self.backend == "hf":
            t += [Task("trace_overhead", c, "trace", "seconds")
                  for c in ("plain_forward", "empty", "save_1", "save_12")]
        return t

    def _gen_kwargs(self, n_new: int) -> dict[str, Any]:
        # Every system generates exactly n_new tokens per prompt (EOS never ends one early).
        if self.backend == "vllm":
            return {"max_new_tokens": n_new, "do_sample": False, "ignore_eos": True}
        return {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False}

    def _new_ids(self, tracer: Any, prompts: list[str]) -> list[list[int]]:
        """Each request's generated ids, from ``tracer.result`` (prompt ids + generated ids)."""
        tok = self.m.tokenizer
        return [r[len(tok(p)["input_ids"]):].tolist()
                for r, p in zip(tracer.result, prompts, strict=True)]

    def _unsteered(self, prompts: list[str], budgets: list[int]) -> list[list[int]]:
        """The same requests without steering (untimed; once per set of requests)."""
        cache = self.__dict__.setdefault("_references", {})
        key = (tuple(prompts), tuple(budgets))
        if key not in cache:
            m = self.m
            with m.generate(**self._gen_kwargs(max(budgets))) as tr:
                for p, b in zip(prompts, budgets, strict=True):
                    extra = {"max_new_tokens": b} if self.per_invoke_max else {}
                    with tr.invoke(p, **extra):
                        pass
            cache[key] = self._new_ids(tr, prompts)
        return cache[key]

    def _verify_generation(self, tr: Any, prompts: list[str], budgets: list[int],
                           steering: bool) -> dict[str, Any]:
        new = self._new_ids(tr, prompts)
        out: dict[str, Any] = {"new_tokens": [len(x) for x in new]}
        if steering:
            k = verify.COMPARED
            out.update(verify.changed(new[:k], self._unsteered(prompts[:k], budgets[:k])))
        return out

    def _steer_generate(self, case: str, n_prompts: int | None = None) -> dict[str, Any]:
        cfg, m = self.cfg, self.m
        prompts = cfg.gen_prompts[:n_prompts]
        n, L = len(prompts), cfg.steer_layer
        shared = vectors(cfg, 1, 0, self.dtype)[0]
        distinct = vectors(cfg, n, 1, self.dtype)
        all_layers = case in ("distinct_all_layers", "idiom_all_layers")
        per_layer = layer_vectors(cfg, n, self.dtype) if all_layers else None
        with Timer() as t:
            with m.generate(**self._gen_kwargs(cfg.sizes.gen_new_tokens)) as tr:
                for i, p in enumerate(prompts):
                    with tr.invoke(p):
                        if case == "none":
                            continue
                        with tr.all():
                            if case == "shared_1layer":
                                m.layers[L].output.steer(shared)
                            elif case == "distinct_1layer":
                                m.layers[L].output.steer(distinct[i])
                            elif case == "idiom_all_layers":   # as nnsight users write it
                                for j in range(cfg.num_layers):
                                    m.layers[j].output[:] += per_layer[j, i]
                            else:
                                for j in range(cfg.num_layers):
                                    m.layers[j].output.steer(per_layer[j, i])
        check = self._verify_generation(tr, prompts, [cfg.sizes.gen_new_tokens] * n,
                                        case != "none")
        return {"seconds": t.seconds, "tokens": sum(check["new_tokens"]), "items": n,
                "verify": check}

    def run_capture(self, task: Task) -> dict[str, Any]:
        case = task.case
        cfg, m = self.cfg, self.m
        saved: list[Any] = []
        with Timer() as t:
            with m.trace() as tr:
                for p in cfg.capture_prompts:
                    with tr.invoke(p):
                        if case == "last_all_layers":
                            for j in range(cfg.num_layers):
                                saved.append(m.layers[j].output[:, -1].save())
                        else:
                            for j in cfg.sizes.capture_full_layers:
                                saved.append(m.layers[j].output.save())
        lens = [len(m.tokenizer(p)["input_ids"]) for p in cfg.capture_prompts]
        last = case == "last_all_layers"
        per_prompt = cfg.num_layers if last else len(cfg.sizes.capture_full_layers)
        check = {"captures": verify.capture_shapes(saved, lens, per_prompt, cfg.hidden_size,
                                                   last)}
        return {"seconds": t.seconds, "tokens": sum(lens), "items": len(cfg.capture_prompts),
                "verify": check}

    def _patch_sweep(self) -> dict[str, Any]:
        """The whole grid in one trace: a clean invoke, then one invoke per (layer, position)
        reading the clean invoke's value (cross-invoke, no barrier)."""
        m, n_layers = self.m, self.cfg.sizes.sweep_layers
        target = m.tokenizer(TARGET_TOKEN, add_special_tokens=False)["input_ids"][0]
        seq = len(m.tokenizer(CLEAN_PROMPT)["input_ids"])
        probs: list[Any] = []
        with Timer() as t:
            with m.trace() as tr:
                with tr.invoke(CLEAN_PROMPT):
                    clean = [m.layers[i].output for i in range(n_layers)]
                for layer in range(n_layers):
                    for pos in range(seq):
                        with tr.invoke(CORRUPT_PROMPT):
                            m.layers[layer].output[:, pos, :] = clean[layer][:, pos, :]
                            probs.append(m.logits[0, -1].softmax(-1)[target].save())
            grid = torch.stack([torch.as_tensor(p) for p in probs]).view(n_layers, seq)
        return {"seconds": t.seconds, "tokens": None, "items": 1,
                "check": {"max_p_target": float(grid.max())}}

    def _patch_sweep_nnsight_idiom(self) -> dict[str, Any]:
        """The sweep as nnsight users write it (nnsight's ``invokes_per_layer`` code with the
        import changed): a clean trace saving every layer, then one trace per layer with an
        invoke per position, reading ``model.output.logits``."""
        m, n_layers = self.m, self.cfg.sizes.sweep_layers
        layers = m.model.layers
        target = m.tokenizer.encode(TARGET_TOKEN, add_special_tokens=False)[0]
        with Timer() as t:
            clean: dict[int, Any] = {}
            with m.trace(CLEAN_PROMPT):
                for i in range(n_layers):
                    clean[i] = layers[i].output.save()
            seq = clean[0].shape[1]
            results = torch.zeros(n_layers, seq)
            for layer in range(n_layers):
                row = []
                with m.trace() as tr:
                    for pos in range(seq):
                        with tr.invoke(CORRUPT_PROMPT):
                            layers[layer].output[:, pos, :] = clean[layer][:, pos, :]
                            row.append(m.output.logits[:, -1].softmax(-1)[0, target].save())
                results[layer] = torch.stack([torch.as_tensor(r).cpu() for r in row])
        return {"seconds": t.seconds, "tokens": None, "items": 1,
                "check": {"max_p_target": float(results.max())}}

    def _many_users(self) -> dict[str, Any]:
        cfg, m = self.cfg, self.m
        v = vectors(cfg, len(cfg.users), 2, self.dtype)
        longest = max(u["max_tokens"] for u in cfg.users)
        with Timer() as t:
            with m.generate(**self._gen_kwargs(longest)) as tr:
                for u in cfg.users:
                    extra = {"max_new_tokens": u["max_tokens"]} if self.per_invoke_max else {}
                    with tr.invoke(u["prompt"], **extra):
                        with tr.all():
                            m.layers[u["layer"]].output.steer(v[u["index"]])
        # Without per-invoke limits the batch runs to the longest; only asked-for tokens count.
        budgets = [u["max_tokens"] for u in cfg.users]
        check = self._verify_generation(tr, [u["prompt"] for u in cfg.users], budgets, True)
        counted = sum(min(g, b) for g, b in zip(check["new_tokens"], budgets, strict=True))
        return {"seconds": t.seconds, "tokens": counted, "items": len(cfg.users),
                "verify": check}

    def run_trace_overhead(self, task: Task) -> dict[str, Any]:
        case = task.case
        m, n = self.m, self.cfg.sizes.overhead_calls
        ids = m.tokenizer(CLEAN_PROMPT, return_tensors="pt")["input_ids"].to(self.cfg.device)
        hf_model = m._model  # the wrapped transformers model: the plain-forward baseline
        with torch.no_grad():
            hf_model(ids)  # warm-up
        keep: list[Any] = []
        with Timer() as t:
            for _ in range(n):
                if case == "plain_forward":
                    with torch.no_grad():
                        hf_model(ids)
                elif case == "empty":
                    with m.trace(CLEAN_PROMPT):
                        pass
                elif case == "save_1":
                    with m.trace(CLEAN_PROMPT):
                        keep = [m.layers[self.cfg.steer_layer].output.save()]
                else:
                    with m.trace(CLEAN_PROMPT):
                        keep = [m.layers[j].output.save() for j in range(12)]
        assert case in ("plain_forward", "empty") or len(keep) in (1, 12)
        return {"seconds": t.seconds, "tokens": None, "items": n}

    def _cold_prefix_cache(self) -> None:
        """Start every repetition with an empty prefix cache, as plain vLLM does (a hit from
        the previous repetition would make prefill look free). Reaches into the backend's
        engine: benchmark fairness, not a user API."""
        llm = getattr(getattr(self.m, "_backend", None), "llm", None)
        if llm is not None and hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()

    def run(self, task: Task) -> dict[str, Any]:
        self._cold_prefix_cache()
        return super().run(task)

    def run_steer_generate(self, task: Task) -> dict[str, Any]:
        return self._steer_generate(task.case)

    def run_concurrency(self, task: Task) -> dict[str, Any]:
        return self._steer_generate("distinct_1layer", self.concurrency_n(task))

    def run_patch_sweep(self, task: Task) -> dict[str, Any]:
        if task.variant == "nnsight_idiom":
            return self._patch_sweep_nnsight_idiom()
        return self._patch_sweep()

    def run_many_users(self, task: Task) -> dict[str, Any]:
        return self._many_users()
