"""API keys: loaded from a file or the environment, kept only as SHA-256 hashes.

Key file: one key a line, ``<key> [name] [limit=value ...]`` (``#`` starts a comment), e.g.
``sk-alice alice concurrent=8 tokens_per_minute=200000``. Environment: ``VINTERP_API_KEYS``,
comma-separated keys. A key's ``id`` (its name, or a hash prefix) owns its vectors, captures
and traces.

Example::

    keys = ApiKeys.parse("sk-alice alice concurrent=2\\n")
    keys.lookup("sk-alice").limits.concurrent     # 2
    keys.lookup("sk-mallory")                     # None
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Per-key limits: past ``concurrent`` or ``tokens_per_minute`` a request gets 429, past
    ``capture_bytes`` or ``graph_nodes`` 413."""

    concurrent: int = 64                    # requests in flight
    tokens_per_minute: int = 2_000_000      # prompt + generated tokens, last 60 s
    capture_bytes: int = 64 * 2**20         # what one request may capture
    graph_nodes: int = 100_000              # nodes in one request's / trace's graph


@dataclass(frozen=True)
class KeyInfo:
    """Who is calling: ``id`` owns per-key objects; ``limits`` bound their requests."""

    id: str
    limits: Limits = field(default_factory=Limits)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Known keys, by hash. Empty: the server runs open (loopback only, see ``serve``)."""

    def __init__(self, defaults: Limits | None = None) -> None:
        self.defaults = defaults or Limits()
        self._by_hash: dict[str, KeyInfo] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def add(self, key: str, name: str | None = None, **limits: int) -> KeyInfo:
        """Register a key (kept hashed)."""
        if len(key) < 8:
            raise ValueError(f"an API key must be at least 8 characters (this one has "
                             f"{len(key)})")
        h = _hash(key)
        info = KeyInfo(id=name or f"key-{h[:12]}", limits=replace(self.defaults, **limits))
        self._by_hash[h] = info
        return info

    def lookup(self, key: str | None) -> KeyInfo | None:
        """The key's info, or ``None`` for an unknown key (constant-time compare)."""
        if not key:
            return None
        h = _hash(key)
        for known, info in self._by_hash.items():
            if hmac.compare_digest(known, h):
                return info
        return None

    @classmethod
    def parse(cls, text: str, defaults: Limits | None = None, *,
              source: str = "key file") -> ApiKeys:
        """Keys from key-file text (format in the module docstring); a bad line raises
        ``ValueError`` naming ``source`` and the line number."""
        keys = cls(defaults)
        keys._add_lines(enumerate(text.splitlines(), 1), f"{source}, line")
        return keys

    @classmethod
    def load(cls, path: str | Path | None, defaults: Limits | None = None) -> ApiKeys:
        """Keys from ``path`` (if given) and ``VINTERP_API_KEYS``; a bad entry raises
        ``ValueError`` naming the file and line (or the variable and the key's position)."""
        keys = cls.parse(Path(path).read_text(), defaults, source=f"key file {path}") \
            if path else cls(defaults)
        # numbered by position in the variable (blanks counted), so "key 3" is the third
        # comma-separated entry as the user typed it
        env = os.environ.get("VINTERP_API_KEYS", "")
        keys._add_lines(enumerate(env.split(","), 1), "VINTERP_API_KEYS, key")
        return keys

    def _add_lines(self, lines: Iterable[tuple[int, str]], where: str) -> None:
        names = {f.name for f in fields(Limits)}
        for number, line in lines:
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key, rest = words[0], words[1:]
            name = None
            limits: dict[str, int] = {}
            try:
                for w in rest:
                    if "=" in w:
                        k, _, v = w.partition("=")
                        if k not in names or not v.isdigit():
                            raise ValueError(f"bad limit {w!r}; use "
                                             f"{'/'.join(sorted(names))}=<integer>")
                        limits[k] = int(v)
                    else:
                        name = w
                self.add(key, name, **limits)
            except ValueError as exc:
                # where the bad entry is, so a long key file can be fixed without bisecting it
                # (the message never repeats the key: it is a secret, even a bad one)
                raise ValueError(f"{where} {number}: {exc}") from None
