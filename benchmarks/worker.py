"""Worker process: loads one system's model once, then serves tasks over a pipe.

Protocol: one JSON object per line. The driver writes requests to stdin
(``{"op": "setup", "config": ..., "warm_config": ...}``, ``{"op": "run", "task": ...}``,
``{"op": "warm", "task": ...}``, ``{"op": "quit"}``); the
worker answers each with one line on a private copy of its original stdout. File descriptor 1
is then pointed at stderr, so that vLLM's, nnsight's and transformers' prints and progress bars
can never corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any


def _channel() -> Any:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def main(argv: list[str]) -> int:
    name = argv[0]
    proto = _channel()

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    if os.environ.get("VINTERP_BENCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["VINTERP_BENCH_THREADS"]))

    from benchmarks.systems.base import NotAvailable, Task
    from benchmarks.workloads import WorkloadConfig

    system = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "setup":
                from benchmarks.systems import make_system

                try:
                    system = make_system(name)
                    info = system.setup(WorkloadConfig.from_json(req["config"]))
                    warm_cfg = WorkloadConfig.from_json(req.get("warm_config", req["config"]))
                except (ImportError, NotAvailable) as e:
                    reply({"ok": False, "skip": f"not available: {e}"})
                    continue
                reply({
                    "ok": True, "info": info, "skipped": system.skipped(),
                    "tasks": [t.__dict__ for t in system.tasks()],
                })
            elif req["op"] in ("run", "warm"):
                assert system is not None, "run before setup"
                try:
                    if req["op"] == "warm":
                        system.warm(Task(**req["task"]), warm_cfg)
                        reply({"ok": True, "result": None})
                    else:
                        task = Task(**req["task"])
                        if os.environ.get("VINTERP_BENCH_DIE_ON") == f"{name}:{task.key}":
                            # the harness's own test: a worker killed mid-task (as by the
                            # kernel's OOM killer) must cost the run only that task
                            os.kill(os.getpid(), signal.SIGKILL)
                        reply({"ok": True, "result": system.run(task)})
                except NotAvailable as e:
                    reply({"ok": False, "skip": f"not available: {e}"})
            elif req["op"] == "quit":
                reply({"ok": True})
                break
        except Exception as e:  # report, keep serving: one failing task must not end the run
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
