"""Small helpers shared by the server tests."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

import numpy as np
import torch

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789",
        "tight": "sk-tight-0123456789", "streamer": "sk-streamer-0123456789",
        "queued": "sk-queued-0123456789", "sessions": "sk-sessions-0123456789",
        "charged": "sk-charged-0123456789"}
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 512
MAX_BODY = 2 * 2**20


def wait_until(check: Callable[[], object], what: str, timeout: float = 60.0,
               every: float = 0.05) -> object:
    """Poll ``check`` until it returns something truthy and return that; fail naming
    ``what`` after ``timeout`` seconds. A deadline, not a count of polls: a loaded CI
    machine can take seconds to get a request to the worker."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


def npy(item: dict) -> torch.Tensor:
    """A capture item's inline ``.npy`` data as a tensor."""
    return torch.from_numpy(np.load(io.BytesIO(base64.b64decode(item["data"])),
                                    allow_pickle=False))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative difference (to b's scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def values(vec: torch.Tensor) -> dict:
    """A vector as the ``{"values": [...]}`` field."""
    return {"values": [float(x) for x in vec]}


def fetch(served, item: dict, who: str = "alice") -> torch.Tensor:
    """A capture item's array, inline or fetched from ``/v1/captures/{id}``."""
    if "data" in item and item["data"] is not None:
        return npy(item)
    with served.client(who) as c:
        r = c.get(f"/v1/captures/{item['id']}")
        r.raise_for_status()
        return torch.from_numpy(np.load(io.BytesIO(r.content), allow_pickle=False))
