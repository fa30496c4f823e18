"""``make demo``: the main job on the embedded default model (smollm2-135m), locally and
through ``vinterp serve``.

Locally (the HF backend):

1. a plain greedy completion of "The capital of France is";
2. a trace that saves a residual stream and patches it across prompts (the seed's example);
3. a steered generation with a vector built from two contrastive prompts.

Through the server (started here as a child process on a free loopback port, stopped at the
end whatever happens):

4. a chat completion with the official ``openai`` client, unsteered and then steered with the
   same vector plus a capture (``extra_body``);
5. the patching example of step 2 as a remote trace (``remote=`` the server's URL), whose
   P(" Paris") should equal the local one.

The server's engine core is a spawned child process, so this module does its work only under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vinterp import LanguageModel

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT = "Describe your day in one sentence."
LAYER = 8
SCALE = 4.0
SERVER_START_TIMEOUT = 300.0


class ServerStartError(RuntimeError):
    """``vinterp serve`` exited or did not answer ``/health`` in time (the message ends with
    the tail of its log)."""


def _completion(model: LanguageModel, ids: torch.Tensor, prompt_len: int) -> str:
    return model.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)


def _patched_paris(model: LanguageModel, remote: str | bool = False) -> tuple[float, tuple]:
    """The seed's patching example: P(" Paris") on the Colosseum prompt with the Eiffel
    prompt's layer-8 residual written in (locally, or on a server with ``remote=``), and the
    residual's shape."""
    with model.trace("The Eiffel Tower is in the city of", remote=remote):
        clean = model.layers[LAYER].output.save()
    with model.trace("The Colosseum is in the city of", remote=remote):
        model.layers[LAYER].output[:] = clean
        patched = model.logits.save()
    paris = model.tokenizer.encode(" Paris")[0]
    return torch.softmax(patched[0, -1], dim=-1)[paris].item(), tuple(clean.shape)


def local(model: LanguageModel) -> tuple[float, torch.Tensor]:
    """Steps 1-3; returns the patched P(" Paris") and the steering vector."""
    prompt_len = len(model.tokenizer(PROMPT)["input_ids"])

    with model.generate(PROMPT, max_new_tokens=8) as tracer:
        pass
    print(f"plain:    {PROMPT!r} -> {_completion(model, tracer.result[0], prompt_len)!r}")

    p, shape = _patched_paris(model)
    print(f"trace:    layer {LAYER} residual {shape}; patched Eiffel->Colosseum: "
          f"P(' Paris') = {p:.3f}")

    with model.trace() as tracer:
        with tracer.invoke("I love this. It is wonderful and"):
            pos = model.layers[LAYER].output.mean(dim=1)[0].save()
        with tracer.invoke("I hate this. It is terrible and"):
            neg = model.layers[LAYER].output.mean(dim=1)[0].save()
    vector = pos - neg
    with model.generate(PROMPT, max_new_tokens=12) as tracer:
        with tracer.all():
            model.layers[LAYER].output.steer(vector, scale=SCALE)
    print(f"steered:  {PROMPT!r} -> {_completion(model, tracer.result[0], prompt_len)!r}")
    return p, vector


@contextmanager
def served(extra: list[str] | None = None) -> Iterator[str]:
    """``vinterp serve`` in a child process on a free loopback port, without API keys; yields
    its URL once ``/health`` answers and always stops it. A server that fails to start raises
    :class:`ServerStartError` with the tail of its log."""
    from vinterp_server.process import launch, serve_command

    fd, name = tempfile.mkstemp(prefix="vinterp-demo-server-", suffix=".log")
    os.close(fd)
    log = Path(name)
    env = {k: v for k, v in os.environ.items() if k != "VINTERP_API_KEYS"}  # keyless: loopback
    start = time.monotonic()
    try:
        srv = launch(serve_command(MODEL, "--host", "127.0.0.1", *(extra or [])), log=log,
                     env=env, replace_env=True, timeout=SERVER_START_TIMEOUT)
    except RuntimeError as exc:
        raise ServerStartError(f"{exc}\n(log kept: {log})") from None
    print(f"server:   `vinterp serve --model {MODEL}` ready on {srv.url} "
          f"in {time.monotonic() - start:.0f} s")
    ok = False
    try:
        yield srv.url
        ok = True
    finally:
        code = srv.stop()
        if ok:
            print(f"server:   stopped (exit code {code})")
            log.unlink(missing_ok=True)
        else:
            print(f"server:   exit code {code}; its log is kept: {log}", file=sys.stderr)


def remote(model: LanguageModel, p_local: float, vector: torch.Tensor,
           server_args: list[str] | None = None) -> None:
    """Steps 4-5 against a fresh server (``server_args``: more ``vinterp serve`` options)."""
    import openai

    with served(["--max-model-len", "1024", *(server_args or [])]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": CHAT}]
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                               temperature=0)
        steered = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0,
            extra_body={
                "interventions": [{"op": "steer", "layers": [LAYER],
                                   "vector": {"values": vector.tolist()}, "scale": SCALE}],
                "capture": [{"point": f"layers.{LAYER}.output", "positions": "last",
                             "steps": "all"}]})
        (cap,) = steered.choices[0].model_extra["captures"]
        print(f"chat:     {CHAT!r} (openai client)")
        print(f"  plain:    {plain.choices[0].message.content!r}")
        print(f"  steered:  {steered.choices[0].message.content!r}")
        print(f"capture:  {cap['point']}, last position, every step: {cap['dtype']} shape "
              f"{cap['shape']} ({steered.usage.completion_tokens} tokens generated)")
        p, _ = _patched_paris(model, remote=url)
        print(f"remote:   patched Eiffel->Colosseum through the server: P(' Paris') = {p:.3f} "
              f"(local {p_local:.3f})")


def main(server_args: list[str] | None = None) -> int:
    """Run the five steps and print what each gives; 1 if the server would not start."""
    model = LanguageModel(MODEL, dtype=torch.float32)
    p_local, vector = local(model)
    try:
        remote(model, p_local, vector, server_args)
    except ServerStartError as exc:
        print(f"demo: the server part failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
