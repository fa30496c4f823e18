"""Which rows of this step's flattened token batch belong to which request.

vLLM runs every scheduled request in one ``[num_tokens, hidden]`` tensor: prefill chunks and
decode tokens of different requests side by side. The attention metadata's ``query_start_loc``
gives each request's row range (in ``input_batch.req_ids`` order) and the ``positions``
argument of the model's forward gives absolute token positions, so a chunk that starts in the
middle of a prompt still knows where it is.

Example::

    >>> s = RowSpan(req_index=0, req_id="a", start=0, stop=3, first_pos=5, prompt_len=5)
    >>> (s.n, s.steps())
    (3, [1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSpan:
    """One request's rows ``[start, stop)`` in the batch, starting at absolute ``first_pos``."""

    req_index: int
    req_id: str
    start: int
    stop: int
    first_pos: int
    prompt_len: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def last_pos(self) -> int:
        return self.first_pos + self.n - 1

    def steps(self) -> list[int]:
        """Generation step of each row: 0 for prompt rows, ``pos - prompt_len + 1`` after."""
        return [max(0, p - self.prompt_len + 1) for p in range(self.first_pos, self.last_pos + 1)]

    @property
    def samples(self) -> bool:
        """True when this step ends at or past the prompt's end (a token is sampled)."""
        return self.last_pos >= self.prompt_len - 1

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(self.first_pos, self.last_pos + 1, device=device)


def query_start_loc() -> list[int] | None:
    """Row offsets of each request in the current forward (``None`` outside a forward)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if meta is None:
        return None
    if isinstance(meta, list):  # micro-batches: not used with eager CPU/GPU here
        meta = meta[0]
    if isinstance(meta, dict):
        if not meta:
            return None
        meta = next(iter(meta.values()))
    qsl = getattr(meta, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = meta.query_start_loc
    return [int(x) for x in qsl.tolist()]


def batch_spans(input_batch: object, positions: torch.Tensor, wanted: set[str]) -> list[RowSpan]:
    """Row spans of the requests in ``wanted`` for the forward now starting.

    ``input_batch`` is the V1 model runner's ``InputBatch``; ``positions`` the model's
    ``positions`` argument (absolute position of every row).
    """
    qsl = query_start_loc()
    if qsl is None:
        return []
    req_ids = input_batch.req_ids  # type: ignore[attr-defined]
    num_reqs = min(len(req_ids), len(qsl) - 1)
    idx = [i for i in range(num_reqs) if req_ids[i] in wanted]
    if not idx:
        return []
    starts = torch.tensor([qsl[i] for i in idx], dtype=torch.long)
    first = positions.index_select(0, starts.to(positions.device)).tolist()
    plens = input_batch.num_prompt_tokens  # type: ignore[attr-defined]
    return [RowSpan(i, req_ids[i], qsl[i], qsl[i + 1], int(f), int(plens[i]))
            for i, f in zip(idx, first, strict=True)]
