"""nnsight (the PyPI release, from .bench-venv): the library users would otherwise use.

Written the way nnsight's docs and the seed workflows write it: ``LanguageModel`` traces,
``tracer.invoke`` per prompt for batching, ``tracer.all()`` to steer every generation step.
Runs requests one at a time as well (how NDIF serves them), on a subset, reported per request.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import verify
from benchmarks.systems.base import NotAvailable, System, Task, Timer
from benchmarks.workloads import (
    CLEAN_PROMPT,
    CORRUPT_PROMPT,
    STEER_CASES,
    TARGET_TOKEN,
    WorkloadConfig,
    device_map,
    layer_vectors,
    vectors,
)


class NnsightSystem(System):
    def setup(self, cfg: WorkloadConfig) -> dict[str, Any]:
        try:
            import nnsight
            from nnsight import LanguageModel
        except ImportError as e:
            raise NotAvailable(f"nnsight not installed ({e}); run `make bench-setup`") from e
        import transformers

        self.cfg = cfg
        self.dtype = getattr(torch, cfg.dtype)
        with Timer() as t:
            self.m = LanguageModel(cfg.model_path, dtype=self.dtype, dispatch=True,
                                   **device_map(cfg))
        self.layers = self.m.model.layers
        return {"load_s": t.seconds, "dtype": cfg.dtype,
                "versions": {"nnsight": nnsight.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__}}

    def tasks(self) -> list[Task]:
        t = [Task("steer_generate", c, "invokes") for c in STEER_CASES]
        t += [Task("steer_generate", "distinct_1layer", "one_at_a_time")]
        t += [Task("concurrency", x.case, "invokes") for x in self.levels(self.cfg)]
        t += [Task("capture", c, "invokes") for c in ("last_all_layers", "full_4layers")]
        t += [Task("patch_sweep", "grid", "seed_loop", "seconds"),
              Task("patch_sweep", "grid", "invokes_per_layer", "seconds")]
        t += [Task("many_users", "steered", "one_at_a_time"),
              Task("many_users", "steered", "invokes_to_longest")]
        t += [Task("trace_overhead", c, "trace", "seconds")
              for c in ("plain_forward", "empty", "save_1", "save_12")]
        return t

    # -- what a generation produced (measured, outside the timings) -------------------------
    def _new_ids(self, out: torch.Tensor, prompts: list[str]) -> list[list[int]]:
        """Each row's generated ids: ``tracer.result`` is the left-padded batch + new ids."""
        width = self.m.tokenizer(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
        return out[:, width:].tolist()

    def _unsteered(self, prompts: list[str], n_new: int) -> list[list[int]]:
        """The same prompts generated without steering (untimed; once per prompt set)."""
        cache = self.__dict__.setdefault("_references", {})
        key = (tuple(prompts), n_new)
        if key not in cache:
            with self.m.generate(max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False) as tr:
                for p in prompts:
                    with tr.invoke(p):
                        pass
                with tr.invoke():
                    out = tr.result.save()
            cache[key] = self._new_ids(out, prompts)
        return cache[key]

    def _verify(self, new: list[list[int]], prompts: list[str], n_new: int,
                steering: bool) -> dict[str, Any]:
        check: dict[str, Any] = {"new_tokens": [len(x) for x in new]}
        if steering:
            k = verify.COMPARED
            check.update(verify.changed(new[:k], self._unsteered(prompts[:k], n_new)))
        return check

    # -- steered generation ------------------------------------------------------------------
    def _steer_generate(self, case: str, n_prompts: int | None = None) -> dict[str, Any]:
        cfg, m, layers = self.cfg, self.m, self.layers
        prompts, n_new = cfg.gen_prompts[:n_prompts], cfg.sizes.gen_new_tokens
        n, L = len(prompts), cfg.steer_layer
        shared = vectors(cfg, 1, 0, self.dtype)[0]
        distinct = vectors(cfg, n, 1, self.dtype)
        per_layer = layer_vectors(cfg, n, self.dtype) if case == "distinct_all_layers" else None
        with Timer() as t:
            with m.generate(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False) as tr:
                for i, p in enumerate(prompts):
                    with tr.invoke(p):
                        if case != "none":
                            with tr.all():
                                if case == "shared_1layer":
                                    layers[L].output = layers[L].output + shared
                                elif case == "distinct_1layer":
                                    layers[L].output = layers[L].output + distinct[i]
                                else:
                                    for j in range(cfg.num_layers):
                                        layers[j].output = layers[j].output + per_layer[j, i]
                with tr.invoke():   # the generated ids, to count (an empty invoke)
                    out = tr.result.save()
        check = self._verify(self._new_ids(out, prompts), prompts, n_new, case != "none")
        return {"seconds": t.seconds, "tokens": sum(check["new_tokens"]), "items": n,
                "verify": check}

    def _one_at_a_time(self, reqs: list[tuple[str, int, int, torch.Tensor]]) -> dict[str, Any]:
        """Each request (prompt, max_tokens, layer, vector) in its own generate, in turn."""
        m, layers = self.m, self.layers
        outs = []
        with Timer() as t:
            for prompt, n_new, layer, vec in reqs:
                with m.generate(max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False) as tr:
                    with tr.invoke(prompt):
                        with tr.all():
                            layers[layer].output = layers[layer].output + vec
                    with tr.invoke():   # the generated ids, to count (an empty invoke)
                        outs.append(tr.result.save())
        new = [self._new_ids(o, [r[0]])[0] for o, r in zip(outs, reqs, strict=True)]
        check: dict[str, Any] = {"new_tokens": [len(x) for x in new]}
        k = verify.COMPARED
        ref = [self._unsteered([r[0]], r[1])[0] for r in reqs[:k]]
        check.update(verify.changed(new[:k], ref))
        counted = sum(min(len(x), r[1]) for x, r in zip(new, reqs, strict=True))
        return {"seconds": t.seconds, "tokens": counted, "items": len(reqs), "verify": check}

    # -- capture -----------------------------------------------------------------------------
    # One trace of all 256 prompts, as the docs write it. It peaks at 11.7 GB resident in
    # nnsight 0.8.1 for last_all_layers (about 42 MB per prompt with 30 saves; 64 prompts per
    # trace in 4 traces peak the same), so it cannot run next to the vLLM workers on a 24 GB
    # machine: the kernel's OOM killer ends it. Run capture with the HF-side systems only there.
    def run_capture(self, task: Task) -> dict[str, Any]:
        case = task.case
        cfg, m, layers = self.cfg, self.m, self.layers
        saved: list[Any] = []
        with Timer() as t:
            with m.trace() as tr:
                for p in cfg.capture_prompts:
                    with tr.invoke(p):
                        if case == "last_all_layers":
                            for j in range(cfg.num_layers):
                                saved.append(layers[j].output[:, -1].save())
                        else:
                            for j in cfg.sizes.capture_full_layers:
                                saved.append(layers[j].output.save())
        lens = [len(m.tokenizer(p)["input_ids"]) for p in cfg.capture_prompts]
        last = case == "last_all_layers"
        per_prompt = cfg.num_layers if last else len(cfg.sizes.capture_full_layers)
        # (nnsight's invokes share one left-padded batch: each full value has its padding)
        check = {"captures": verify.capture_shapes(saved, lens, per_prompt, cfg.hidden_size,
                                                   last, padded=True)}
        return {"seconds": t.seconds, "tokens": sum(lens), "items": len(cfg.capture_prompts),
                "verify": check}

    # -- patching sweep ----------------------------------------------------------------------
    def _clean_cache(self, n_layers: int) -> dict[int, Any]:
        clean: dict[int, Any] = {}
        with self.m.trace(CLEAN_PROMPT):
            for i in range(n_layers):
                clean[i] = self.layers[i].output.save()
        return clean

    def _patch_sweep(self, variant: str) -> dict[str, Any]:
        m, layers = self.m, self.layers
        n_layers = self.cfg.sizes.sweep_layers
        target = m.tokenizer.encode(TARGET_TOKEN, add_special_tokens=False)[0]
        with Timer() as t:
            clean = self._clean_cache(n_layers)
            seq = clean[0].shape[1]
            results = torch.zeros(n_layers, seq)
            if variant == "seed_loop":  # the seed's patch_sweep, verbatim but for names
                for layer in range(n_layers):
                    for pos in range(seq):
                        with m.trace(CORRUPT_PROMPT):
                            current = layers[layer].output
                            current[:, pos, :] = clean[layer][:, pos, :]
                            logits = m.output.logits.save()
                        probs = torch.softmax(logits[0, -1], dim=-1)
                        results[layer, pos] = probs[target].item()
            else:  # one trace per layer, one invoke per position
                for layer in range(n_layers):
                    row = []
                    with m.trace() as tr:
                        for pos in range(seq):
                            with tr.invoke(CORRUPT_PROMPT):
                                layers[layer].output[:, pos, :] = clean[layer][:, pos, :]
                                row.append(m.output.logits[:, -1].softmax(-1)[0, target].save())
                    results[layer] = torch.stack([torch.as_tensor(r) for r in row])
        return {"seconds": t.seconds, "tokens": None, "items": 1,
                "check": {"max_p_target": float(results.max())}}

    # -- many users --------------------------------------------------------------------------
    def _many_users(self, variant: str) -> dict[str, Any]:
        cfg, m, layers = self.cfg, self.m, self.layers
        v = vectors(cfg, len(cfg.users), 2, self.dtype)
        if variant == "one_at_a_time":
            sub = cfg.users[: cfg.sizes.serial_subset]
            return self._one_at_a_time(
                [(u["prompt"], u["max_tokens"], u["layer"], v[u["index"]]) for u in sub])
        # Invokes share one generate call, hence one max_new_tokens: generate to the longest
        # and count only the tokens each user asked for.
        longest = max(u["max_tokens"] for u in cfg.users)
        with Timer() as t:
            with m.generate(max_new_tokens=longest, min_new_tokens=longest,
                            do_sample=False) as tr:
                for u in cfg.users:
                    with tr.invoke(u["prompt"]):
                        with tr.all():
                            lay = layers[u["layer"]]
                            lay.output = lay.output + v[u["index"]]
                with tr.invoke():   # the generated ids, to count (an empty invoke)
                    out = tr.result.save()
        prompts = [u["prompt"] for u in cfg.users]
        new = self._new_ids(out, prompts)
        check = self._verify(new, prompts, longest, True)
        counted = sum(min(len(x), u["max_tokens"]) for x, u in zip(new, cfg.users, strict=True))
        return {"seconds": t.seconds, "tokens": counted, "items": len(cfg.users),
                "verify": check}

    # -- trace overhead ----------------------------------------------------------------------
    def run_trace_overhead(self, task: Task) -> dict[str, Any]:
        case = task.case
        m, layers, n = self.m, self.layers, self.cfg.sizes.overhead_calls
        ids = m.tokenizer(CLEAN_PROMPT, return_tensors="pt")["input_ids"].to(self.cfg.device)
        with torch.no_grad():
            m._module(ids)  # warm-up
        keep: list[Any] = []  # appended to, not rebound: nnsight runs the body elsewhere
        with Timer() as t:
            for _ in range(n):
                keep.clear()
                if case == "plain_forward":
                    with torch.no_grad():
                        m._module(ids)
                elif case == "empty":
                    with m.trace(CLEAN_PROMPT):
                        pass
                elif case == "save_1":
                    with m.trace(CLEAN_PROMPT):
                        keep.append(layers[self.cfg.steer_layer].output.save())
                else:
                    with m.trace(CLEAN_PROMPT):
                        for j in range(12):
                            keep.append(layers[j].output.save())
        assert case in ("plain_forward", "empty") or len(keep) in (1, 12)
        return {"seconds": t.seconds, "tokens": None, "items": n}

    def run_steer_generate(self, task: Task) -> dict[str, Any]:
        cfg = self.cfg
        if task.variant == "one_at_a_time":
            sub = cfg.gen_prompts[: cfg.sizes.serial_subset]
            v = vectors(cfg, len(cfg.gen_prompts), 1, self.dtype)
            return self._one_at_a_time(
                [(p, cfg.sizes.gen_new_tokens, cfg.steer_layer, v[i])
                 for i, p in enumerate(sub)])
        return self._steer_generate(task.case)

    def run_concurrency(self, task: Task) -> dict[str, Any]:
        return self._steer_generate("distinct_1layer", self.concurrency_n(task))

    def run_patch_sweep(self, task: Task) -> dict[str, Any]:
        return self._patch_sweep(task.variant)

    def run_many_users(self, task: Task) -> dict[str, Any]:
        return self._many_users(task.variant)
