"""Plain Hugging Face transformers with raw forward hooks: what users write without a library.

Batched (left-padded) ``generate`` and forwards, with ``register_forward_hook`` doing the same
steering and capture as the other systems. No tracing, no graph: the floor a library's
overhead is measured against on the HF side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks import verify
from benchmarks.systems.base import System, Task, Timer
from benchmarks.systems.hf_common import hf_versions, load_hf, replace_residual, residual
from benchmarks.workloads import (
    CLEAN_PROMPT,
    CORRUPT_PROMPT,
    STEER_CASES,
    TARGET_TOKEN,
    WorkloadConfig,
    layer_vectors,
    vectors,
)


@contextlib.contextmanager
def hooks(model: Any, fns: dict[int, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator:
    """Install ``fns[layer](hidden) -> new hidden or None`` on decoder layers for the block."""
    handles = []
    for layer, fn in fns.items():
        def hook(_m: Any, _i: Any, out: Any, fn: Callable = fn) -> Any:
            new = fn(residual(out))
            return None if new is None else replace_residual(out, new)

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class HFHooksSystem(System):
    def setup(self, cfg: WorkloadConfig) -> dict[str, Any]:
        self.cfg = cfg
        self.model, self.tok, load_s = load_hf(cfg)
        self.dtype = getattr(torch, cfg.dtype)
        return {"load_s": load_s, "dtype": cfg.dtype, "versions": hf_versions()}

    def tasks(self) -> list[Task]:
        t = [Task("steer_generate", c) for c in STEER_CASES]
        t += self.levels(self.cfg)
        t += [Task("capture", "last_all_layers"), Task("capture", "full_4layers")]
        t += [Task("patch_sweep", "grid", "one_batch", "seconds")]
        t += [Task("many_users", "steered", "batched_to_longest")]
        t += [Task("trace_overhead", c, "raw_hooks", "seconds")
              for c in ("plain_forward", "save_1", "save_12")]
        return t

    # -- workloads ---------------------------------------------------------------------------
    def _steer_fns(self, case: str, n: int) -> dict[int, Callable]:
        cfg = self.cfg
        if case == "none":
            return {}
        if case == "shared_1layer":
            v = vectors(cfg, 1, 0, self.dtype)[0]
            return {cfg.steer_layer: lambda h: h + v}
        if case == "distinct_1layer":
            v = vectors(cfg, n, 1, self.dtype)[:, None, :]
            return {cfg.steer_layer: lambda h: h + v}
        if case == "distinct_all_layers":
            lv = layer_vectors(cfg, n, self.dtype)[:, :, None, :]
            return {i: (lambda h, i=i: h + lv[i]) for i in range(cfg.num_layers)}
        raise ValueError(case)

    def _generate(self, prompts: list[str], new_tokens: int,
                  fns: dict) -> tuple[float, list[list[int]]]:
        """Seconds, and each row's generated ids (measured from the output)."""
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.cfg.device)
        with torch.no_grad(), hooks(self.model, fns), Timer() as t:
            out = self.model.generate(
                **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
        return t.seconds, out[:, enc["input_ids"].shape[1]:].tolist()

    def _verify(self, new: list[list[int]], prompts: list[str], n_new: int,
                steering: bool) -> dict[str, Any]:
        """Measured token counts, and (steering) how many of the first requests differ from
        the same requests generated without hooks (untimed, once)."""
        out: dict[str, Any] = {"new_tokens": [len(x) for x in new]}
        if steering:
            k = verify.COMPARED
            cache = self.__dict__.setdefault("_references", {})
            key = (tuple(prompts[:k]), n_new)
            if key not in cache:
                cache[key] = self._generate(prompts[:k], n_new, {})[1]
            out.update(verify.changed(new[:k], cache[key]))
        return out

    def run_capture(self, task: Task) -> dict[str, Any]:
        case = task.case
        cfg = self.cfg
        saved: list[torch.Tensor] = []
        if case == "last_all_layers":
            fns = {i: (lambda h: saved.append(h[:, -1].clone())) for i in range(cfg.num_layers)}
        else:
            fns = {i: (lambda h: saved.append(h.clone())) for i in cfg.sizes.capture_full_layers}
        enc = self.tok(cfg.capture_prompts, return_tensors="pt", padding=True).to(cfg.device)
        with torch.no_grad(), hooks(self.model, fns), Timer() as t:
            self.model(**enc)
        # one padded batch: each hook call saved every prompt's rows at once
        n, width = enc["input_ids"].shape
        want = (n, cfg.hidden_size) if case == "last_all_layers" else (n, width, cfg.hidden_size)
        bad = [f"#{k}: {list(s.shape)} != {list(want)}" for k, s in enumerate(saved)
               if tuple(s.shape) != want]
        tokens = int(enc["attention_mask"].sum())
        return {"seconds": t.seconds, "tokens": tokens, "items": len(cfg.capture_prompts),
                "verify": {"captures": {"count": len(saved) * n, "bad_shapes": bad}}}

    def _patch_sweep(self) -> dict[str, Any]:
        """The whole layer × position grid as one batch: row (l, p) patches position p at l."""
        layers = self.cfg.sizes.sweep_layers
        target = self.tok(TARGET_TOKEN, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad(), Timer() as t:
            dev = self.cfg.device
            clean_ids = self.tok(CLEAN_PROMPT, return_tensors="pt")["input_ids"].to(dev)
            corrupt_ids = self.tok(CORRUPT_PROMPT, return_tensors="pt")["input_ids"].to(dev)
            clean: dict[int, torch.Tensor] = {}
            cap = {i: (lambda h, i=i: clean.__setitem__(i, h[0].clone())) for i in range(layers)}
            with hooks(self.model, cap):
                self.model(clean_ids)
            seq = clean_ids.shape[1]
            rows = torch.arange(seq, device=dev)

            def patch(h: torch.Tensor, layer: int) -> torch.Tensor:
                h = h.clone()
                h[layer * seq + rows, rows] = clean[layer][rows]
                return h

            fns = {i: (lambda h, i=i: patch(h, i)) for i in range(layers)}
            with hooks(self.model, fns):
                logits = self.model(corrupt_ids.repeat(layers * seq, 1)).logits
            grid = logits[:, -1].softmax(-1)[:, target].view(layers, seq)
        return {"seconds": t.seconds, "tokens": None, "items": 1,
                "check": {"max_p_target": float(grid.max())}}

    def _many_users(self) -> dict[str, Any]:
        """One left-padded batch generated to the longest max_tokens (HF has one per batch);
        only the tokens each user asked for count."""
        cfg = self.cfg
        users = cfg.users
        v = vectors(cfg, len(users), 2, self.dtype)
        by_layer: dict[int, list[int]] = {}
        for u in users:
            by_layer.setdefault(u["layer"], []).append(u["index"])

        def steer(h: torch.Tensor, rows: list[int]) -> torch.Tensor:
            h = h.clone()
            h[rows] += v[rows][:, None, :]
            return h

        fns = {layer: (lambda h, r=rows: steer(h, r)) for layer, rows in by_layer.items()}
        longest = max(u["max_tokens"] for u in users)
        prompts = [u["prompt"] for u in users]
        seconds, new = self._generate(prompts, longest, fns)
        check = self._verify(new, prompts, longest, True)
        counted = sum(min(len(x), u["max_tokens"]) for x, u in zip(new, users, strict=True))
        return {"seconds": seconds, "tokens": counted, "items": len(users), "verify": check}

    def run_trace_overhead(self, task: Task) -> dict[str, Any]:
        case = task.case
        n = self.cfg.sizes.overhead_calls
        ids = self.tok(CLEAN_PROMPT, return_tensors="pt")["input_ids"].to(self.cfg.device)
        layers = {"plain_forward": [], "save_1": [self.cfg.steer_layer],
                  "save_12": list(range(12))}[case]
        saved: list[torch.Tensor] = []
        fns = {i: (lambda h: saved.append(h.clone())) for i in layers}
        with torch.no_grad():
            self.model(ids)  # warm-up outside the timing
            with Timer() as t:
                for _ in range(n):
                    with hooks(self.model, fns):
                        self.model(ids)
        return {"seconds": t.seconds, "tokens": None, "items": n}

    def _steered(self, case: str, n: int) -> dict[str, Any]:
        prompts = self.cfg.gen_prompts[:n]
        n_new = self.cfg.sizes.gen_new_tokens
        s, new = self._generate(prompts, n_new, self._steer_fns(case, len(prompts)))
        check = self._verify(new, prompts, n_new, case != "none")
        return {"seconds": s, "tokens": sum(check["new_tokens"]), "items": len(prompts),
                "verify": check}

    def run_steer_generate(self, task: Task) -> dict[str, Any]:
        return self._steered(task.case, len(self.cfg.gen_prompts))

    def run_concurrency(self, task: Task) -> dict[str, Any]:
        return self._steered("distinct_1layer", self.concurrency_n(task))

    def run_patch_sweep(self, task: Task) -> dict[str, Any]:
        return self._patch_sweep()

    def run_many_users(self, task: Task) -> dict[str, Any]:
        return self._many_users()
