"""Fetching a request's named vectors from the store before it compiles: in batches, in the
order compiling meets them, stopping at the first that does not exist, bounded by the key's
graph size."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vinterp_server.auth import KeyInfo, Limits
from vinterp_server.limits import LimitExceeded
from vinterp_server.store import MemoryStore
from vinterp_server.vectors import FETCH_BATCH, stored_vectors

KEY = KeyInfo(id="alice", limits=Limits(graph_nodes=100))


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        self.reads.append(name)
        return await super().get(owner, kind, name)


def fetch(names: list[str], present: set[str]) -> tuple[dict[str, Any], list[str]]:
    store = CountingStore()
    for n in present:
        asyncio.run(store.put("alice", "vector", n, {None: n}, ttl=None))
    found = asyncio.run(stored_vectors(SimpleNamespace(store=store), KEY, names))
    return found, store.reads


def test_every_named_vector_is_fetched():
    names = [f"v{i}" for i in range(3 * FETCH_BATCH + 1)]
    found, reads = fetch(names, set(names))
    assert found == {n: {None: n} for n in names}
    assert sorted(reads) == sorted(names)


def test_fetching_stops_at_the_batch_with_the_first_missing_name():
    """Compiling fails at the first missing name (a 400 naming it): the names after it need
    no read, and a request naming thousands of missing vectors costs one batch."""
    names = [f"v{i}" for i in range(5 * FETCH_BATCH)]
    present = set(names) - {names[FETCH_BATCH + 2]}
    found, reads = fetch(names, present)
    assert reads == names[:2 * FETCH_BATCH]
    assert names[FETCH_BATCH + 1] in found and names[FETCH_BATCH + 2] not in found


def test_more_names_than_the_graph_may_have_nodes_is_refused_before_any_read():
    names = [f"v{i}" for i in range(101)]
    with pytest.raises(LimitExceeded, match="names 101 stored vectors"):
        fetch(names, set())


def test_an_upload_means_what_the_library_reads_from_the_same_file():
    """One tensor named ``layers.8`` is layer 8's, as ``SteeringVector.load`` reads it (the
    server applied it at every layer); several tensors may be named as module paths; two
    names of one layer are refused. A single tensor whose name names no layer stays the
    vector for every layer."""
    from safetensors.torch import save

    from vinterp.steering import SteeringVector
    from vinterp_server.vectors import parse_vectors

    v, w = torch.randn(8), torch.randn(8)
    got = parse_vectors(save({"layers.3": v}), 8, 4)
    assert list(got) == [3] and torch.equal(got[3], v)
    assert list(SteeringVector.from_dict({"layers.3": v}).layers) == [3]
    got = parse_vectors(save({"model.layers.1.mlp.fc2": v, "model.layers.2.mlp.fc2": w}), 8, 4)
    assert torch.equal(got[1], v) and torch.equal(got[2], w)
    assert list(parse_vectors(save({"happy": v}), 8, 4)) == [None]
    with pytest.raises(ValueError, match="both name layer 2"):
        parse_vectors(save({"2": v, "layers.2": w}), 8, 4)
    with pytest.raises(ValueError, match=r"cannot tell which layer .*'fc2'.*name each by its "
                                         r"layer: 0\.\.3"):
        parse_vectors(save({"fc2": v, "layers.1": w}), 8, 4)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        parse_vectors(save({"layers.7": v}), 8, 4)
