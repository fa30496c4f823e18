"""``make demo`` (``python -m vinterp.demo``) as users run it: the lines README.md promises,
locally and through the ``vinterp serve`` it starts, and the server stopped at the end.

The only test of the demo: it starts a real server, so it takes a minute or two.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_prints_local_and_server_results(smollm2_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "vinterp.demo"], capture_output=True,
                          text=True, env=env, timeout=480)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr[-4000:]}"
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines() if ":" in ln}

    assert lines["plain"].startswith("plain:    'The capital of France is' -> ' Paris")
    local = float(re.search(r"trace: .*residual \(1, 9, 576\); patched Eiffel->Colosseum: "
                            r"P\(' Paris'\) = (\d\.\d+)", out).group(1))
    assert abs(local - 0.66) < 0.02
    assert lines["steered"].startswith("steered:  'The capital of France is' -> ")

    assert re.search(r"server:   `vinterp serve --model smollm2-135m` ready on "
                     r"http://127\.0\.0\.1:\d+ in \d+ s", out)
    assert lines["chat"] == "chat:     'Describe your day in one sentence.' (openai client)"
    plain, steered = lines["  plain"].split(":", 1)[1], lines["  steered"].split(":", 1)[1]
    assert plain.strip() and steered.strip() != plain.strip(), "steering changed nothing"
    rows, generated = map(int, re.search(
        r"capture:  layers\.8\.output, last position, every step: float32 shape "
        r"\[(\d+), 576\] \((\d+) tokens generated\)", out).groups())
    assert rows == generated > 0
    served, again = map(float, re.search(
        r"remote:   patched Eiffel->Colosseum through the server: P\(' Paris'\) = (\d\.\d+) "
        r"\(local (\d\.\d+)\)", out).groups())
    assert again == local and abs(served - local) <= 0.002
    assert out.rstrip().splitlines()[-1] == "server:   stopped (exit code 0)"
