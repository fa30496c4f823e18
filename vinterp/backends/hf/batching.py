"""Batch layout for the HF backend: invokes packed as padded rows with true positions.

Left padding lets batched generation append tokens at the end of every row; explicit
``position_ids`` (counting from each row's first real token) make every row's values equal
running that prompt alone — the bug nnsight's issue #672 is about. Encoders (BERT and the like,
which attend both ways and read fixed columns, such as the pooler's ``[CLS]`` at column 0) are
padded on the right instead (``right=True``): left padding would put a pad token where they
look. They do not generate.

Example::

    >>> layout = BatchLayout.build([((1, 2, 3),), ((4,), (5, 6))], pad_id=0)
    >>> layout.input_ids.tolist()
    [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    >>> layout.rows(1), layout.window(1)
    (slice(1, 3, None), (1, 3))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

#: a prompt's other per-token model inputs (``token_type_ids``...), by name: one value per
#: token (first dim), ``None`` for a prompt given without any
TokenFields = Mapping[str, torch.Tensor] | None


@dataclass
class BatchLayout:
    """Rows of each invoke in the padded batch, their padding and prompt lengths."""

    input_ids: torch.Tensor        # [B, T] left-padded
    attention_mask: torch.Tensor   # [B, T]
    position_ids: torch.Tensor     # [B, T] (0 at each row's first real token; pads at 0)
    lengths: torch.Tensor          # [B] prompt length per row
    invoke_rows: dict[int, slice]  # invoke index -> its rows
    right: bool = False            # padded on the right (encoders; see the module doc)
    #: other per-token inputs (``token_type_ids``...) some prompts came with, padded like
    #: ``input_ids`` with 0, also in the rows of prompts without them (0: BERT's default type)
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, prompts_by_invoke: Sequence[tuple[tuple[int, ...], ...]], pad_id: int,
              invokes: Sequence[int] | None = None, *, right: bool = False,
              fields_by_invoke: Sequence[Sequence[TokenFields]] | None = None
              ) -> BatchLayout:
        """Pack the given invokes (all by default) in order, left-padded (``right``: on the
        right); ``fields_by_invoke``: each prompt's :data:`TokenFields`, as the prompts."""
        chosen = list(range(len(prompts_by_invoke))) if invokes is None else list(invokes)
        rows: list[tuple[int, ...]] = []
        row_fields: list[TokenFields] = []
        invoke_rows: dict[int, slice] = {}
        for i in chosen:
            start = len(rows)
            rows.extend(prompts_by_invoke[i])
            row_fields.extend(fields_by_invoke[i] if fields_by_invoke is not None
                              else [None] * len(prompts_by_invoke[i]))
            invoke_rows[i] = slice(start, len(rows))
        for i in chosen:
            if not prompts_by_invoke[i]:   # a prompt-less invoke: the whole batch
                invoke_rows[i] = slice(0, len(rows))
        if not rows:
            raise ValueError("no prompts to run: a prompt-less invoke needs other invokes")
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prompt has no tokens; pass at least one token per prompt")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            cols = slice(0, len(r)) if right else slice(width - len(r), width)
            ids[b, cols] = torch.tensor(r, dtype=torch.long)
            mask[b, cols] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        fields: dict[str, torch.Tensor] = {}
        for b, given in enumerate(row_fields):
            for name, values in (given or {}).items():
                if name not in fields:
                    fields[name] = torch.zeros((len(rows), width, *values.shape[1:]),
                                               dtype=values.dtype)
                r = len(rows[b])
                fields[name][b, slice(0, r) if right else slice(width - r, width)] = values
        return cls(ids, mask, positions, lengths, invoke_rows, right, fields)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, invoke: int) -> slice:
        """Batch rows of ``invoke``."""
        return self.invoke_rows[invoke]

    def window(self, invoke: int) -> tuple[int, int]:
        """The columns ``[start, stop)`` of the prompt step that ``invoke`` sees: its longest
        prompt's, the padding every one of its rows has left out."""
        cache = self.__dict__.setdefault("_windows", {})
        if invoke not in cache:
            longest = int(self.lengths[self.invoke_rows[invoke]].max())
            cache[invoke] = (0, longest) if self.right else (self.width - longest, self.width)
        return cache[invoke]

    def row_positions(self, invoke: int, step: int) -> torch.Tensor:
        """Absolute positions of the invoke's rows at ``step``: ``[n, seq]`` (pads are -1)."""
        lens = self.lengths[self.invoke_rows[invoke]]
        if step == 0:
            start, stop = self.window(invoke)
            cols = torch.arange(stop - start).unsqueeze(0)
            if self.right:
                return torch.where(cols < lens.unsqueeze(1), cols, torch.full((1,), -1))
            pad = (stop - start - lens).unsqueeze(1)
            return torch.where(cols >= pad, cols - pad, torch.full((1,), -1))
        return (lens + step - 1).unsqueeze(1)

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        """Prompt length of each of the invoke's rows, ``[n, 1]``."""
        return self.lengths[self.invoke_rows[invoke]].unsqueeze(1)
