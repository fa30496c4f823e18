"""The generated token ids: ``model.generator.output`` and ``model.samples``.

These values exist only once generation has ended, so the tracer runs what is computed from
them here, after the backend, as a small graph of its own; this module holds that graph's
points (the finished ids, the ids sampled at each step) and how the ids are padded into one
tensor. Separate from the tracer because they are read, not recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vinterp.tracing.errors import TracingError

if TYPE_CHECKING:
    from vinterp.tracing.proxy import Proxy
    from vinterp.tracing.tracer import Tracer


class _GeneratorEnvoy:
    """``model.generator``: the generation as a whole; ``.output`` is the generated ids."""

    __slots__ = ("_tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    @property
    def output(self) -> Proxy:
        """All token ids (prompt then generated) as one tensor, like HF ``generate``'s."""
        return self._tracer.generator_output()


class _GeneratedEvent:
    """The one point of the local post-run graph: the finished generation's token ids."""

    module = "generator"
    kind = "output"
    step = 0

    def __init__(self, rows: dict[int, torch.Tensor]) -> None:
        self._rows = rows

    def get(self, invoke: int) -> torch.Tensor:
        return self._rows[invoke]

    def set(self, invoke: int, value: Any) -> None:
        raise TracingError("the generated token ids cannot be replaced: they exist only after "
                           "generation has ended")

    def row_positions(self, invoke: int) -> torch.Tensor:
        ids = self._rows[invoke]
        return torch.arange(ids.shape[-1]).expand(ids.shape)

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        return torch.zeros(self._rows[invoke].shape[0], 1, dtype=torch.long)


class _SampledEvent:
    """The post-run graph's per-step point: the token ids sampled at step ``step``, one per
    prompt of the invoke (``[prompts]``; the pad id for a prompt whose generation ended)."""

    module = "samples"
    kind = "output"

    def __init__(self, step: int, rows: dict[int, tuple[list[torch.Tensor], list[int]]],
                 pad: int) -> None:
        self.step, self._rows, self._pad = step, rows, pad

    def get(self, invoke: int) -> torch.Tensor:
        ids, lens = self._rows[invoke]
        return torch.tensor([int(r[n + self.step]) if len(r) > n + self.step else self._pad
                             for r, n in zip(ids, lens, strict=True)], dtype=torch.long)

    def set(self, invoke: int, value: Any) -> None:
        raise TracingError(_NO_SAMPLE_WRITES)

    def row_positions(self, invoke: int) -> torch.Tensor:
        ids, lens = self._rows[invoke]
        return torch.tensor([[n + self.step] for n in lens])

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        return torch.tensor([[n] for n in self._rows[invoke][1]])


_NO_SAMPLE_WRITES = (
    "replacing model.samples (forcing the sampled tokens) is not supported: vinterp reads the "
    "sampled ids after generation. Edit model.logits' source instead (e.g. steer a layer), or "
    "start another generation from the tokens you want")


def _pad_generated(rows: list[torch.Tensor], prompt_lens: list[int], pad: int) -> torch.Tensor:
    """Rows of (prompt + new ids) as HF ``generate`` returns a batch: one LongTensor, prompts
    left-padded to the longest prompt, rows with fewer new tokens right-padded."""
    width = max(prompt_lens)
    new = max(len(r) - n for r, n in zip(rows, prompt_lens, strict=True))
    out = torch.full((len(rows), width + new), pad, dtype=torch.long)
    for b, (r, n) in enumerate(zip(rows, prompt_lens, strict=True)):
        out[b, width - n: width - n + len(r)] = r
    return out
