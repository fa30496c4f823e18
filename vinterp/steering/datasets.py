"""The example data shipped with vinterp (``vinterp/steering/data/``) and prompt-file readers.

* ``sentiment_positive.txt`` / ``sentiment_negative.txt``: 100 line-aligned sentiment pairs;
* ``neutral_prompts.txt``: 50 neutral prompts for steered generation;
* ``ab_questions.jsonl``: 40 A/B questions, ``{"question": "...\\n(A) ...\\n(B) ...",
  "matching": "A" | "B"}`` (the answer that matches positive sentiment);
  :func:`ab_answers` splits one into its stem and the two answer texts.

Example::

    pos, neg = sentiment_pairs()
    prompts = read_prompts(data_path("neutral_prompts.txt"))
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


def data_path(name: str) -> Path:
    """Path of a shipped data file."""
    return DATA / name


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: one a line (blank lines skipped), or JSONL with a ``prompt`` or
    ``text`` field. Raises ``ValueError`` for a file with none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    out: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            obj = json.loads(line)
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected a 'prompt' or 'text' string")
            out.append(text)
        else:
            out.append(line.rstrip("\n").replace("\\n", "\n"))
    if not out:
        raise ValueError(f"{path} holds no prompts (empty file)")
    return out


def read_ab_questions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A/B questions from JSONL (``question`` and ``matching``: ``"A"`` or ``"B"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no A/B question file at {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict) or obj.get("matching") not in ("A", "B") \
                or not isinstance(obj.get("question"), str):
            raise ValueError(f"{path}:{n}: an A/B question is {{\"question\": str, "
                             f"\"matching\": \"A\" | \"B\"}}")
        out.append({"question": obj["question"], "matching": obj["matching"]})
    if not out:
        raise ValueError(f"{path} holds no A/B questions (empty file)")
    return out


_AB = re.compile(r"(?P<stem>.*?)\n\(A\) (?P<a>.+?)\n\(B\) (?P<b>.+?)\s*", re.S)


def ab_answers(question: dict[str, Any]) -> tuple[str, str, str]:
    """``(stem, matching answer text, non-matching answer text)`` of an A/B question whose
    text ends in the lines ``(A) ...`` and ``(B) ...``; ``ValueError`` for any other text.

    Example::

        >>> ab_answers({"question": "How was it?\\n(A) Awful.\\n(B) Lovely.", "matching": "B"})
        ('How was it?', 'Lovely.', 'Awful.')
    """
    m = _AB.fullmatch(question["question"])
    if m is None:
        raise ValueError(f"an A/B question must end in the lines '(A) ...' and '(B) ...' to "
                         f"score its answer texts: {question['question'][:80]!r}")
    a, b = m["a"].strip(), m["b"].strip()
    return (m["stem"], a, b) if question["matching"] == "A" else (m["stem"], b, a)


def sentiment_pairs() -> tuple[list[str], list[str]]:
    """The shipped positive and negative sentiment prompts (100 each, paired by index)."""
    return (read_prompts(data_path("sentiment_positive.txt")),
            read_prompts(data_path("sentiment_negative.txt")))


def neutral_prompts() -> list[str]:
    """The shipped 50 neutral prompts."""
    return read_prompts(data_path("neutral_prompts.txt"))


def ab_questions() -> list[dict[str, Any]]:
    """The shipped 40 A/B questions."""
    return read_ab_questions(data_path("ab_questions.jsonl"))
