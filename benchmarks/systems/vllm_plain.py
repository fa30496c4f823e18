"""Plain vLLM (no interventions, our plugin excluded): the throughput baseline.

The driver starts this worker with ``VLLM_PLUGINS`` listing every other general plugin, so the
vinterp entry point never loads here. Two instances run: eager and vLLM's default compiled mode.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.systems.base import System, Task, Timer
from benchmarks.systems.vllm_common import engine_kwargs, vllm_versions
from benchmarks.workloads import WorkloadConfig


class PlainVLLM(System):
    def __init__(self, enforce_eager: bool) -> None:
        self.enforce_eager = enforce_eager

    def setup(self, cfg: WorkloadConfig) -> dict[str, Any]:
        from vllm import LLM

        self.cfg = cfg
        t0 = time.perf_counter()
        self.llm = LLM(**engine_kwargs(cfg, self.enforce_eager))
        info = {"load_s": time.perf_counter() - t0, "dtype": cfg.dtype,
                "enforce_eager": self.enforce_eager, "versions": vllm_versions()}
        return info

    def tasks(self) -> list[Task]:
        return [Task("steer_generate", "none"), *self.levels(self.cfg),
                Task("capture", "prefill"), Task("many_users", "none")]

    def _generate(self, prompts: list[str], max_tokens: list[int]) -> dict[str, Any]:
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                  for m in max_tokens]
        # Each repetition starts cold: a prefix-cache hit from the previous repetition would
        # make prefill (and so capture's baseline) look free.
        self.llm.reset_prefix_cache()
        with Timer() as t:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        return {"seconds": t.seconds, "outs": outs}

    def _decode(self, prompts: list[str], n_new: int) -> dict[str, Any]:
        r = self._generate(prompts, [n_new] * len(prompts))
        new = [len(o.outputs[0].token_ids) for o in r["outs"]]
        return {"seconds": r["seconds"], "tokens": sum(new), "items": len(r["outs"]),
                "verify": {"new_tokens": new}}

    def run_steer_generate(self, task: Task) -> dict[str, Any]:
        return self._decode(self.cfg.gen_prompts, self.cfg.sizes.gen_new_tokens)

    def run_concurrency(self, task: Task) -> dict[str, Any]:
        n = self.concurrency_n(task)
        return self._decode(self.cfg.gen_prompts[:n], self.cfg.sizes.gen_new_tokens)

    def run_capture(self, task: Task) -> dict[str, Any]:
        # Prefill throughput: one sampled token per prompt, prompt tokens / second.
        cfg = self.cfg
        r = self._generate(cfg.capture_prompts, [1] * len(cfg.capture_prompts))
        lens = [len(o.prompt_token_ids) for o in r["outs"]]
        return {"seconds": r["seconds"], "tokens": sum(lens), "items": len(r["outs"]),
                "verify": {"prompt_tokens": lens}}

    def run_many_users(self, task: Task) -> dict[str, Any]:
        users = self.cfg.users
        r = self._generate([u["prompt"] for u in users], [u["max_tokens"] for u in users])
        new = [len(o.outputs[0].token_ids) for o in r["outs"]]
        return {"seconds": r["seconds"], "tokens": sum(new), "items": len(r["outs"]),
                "verify": {"new_tokens": new}}
