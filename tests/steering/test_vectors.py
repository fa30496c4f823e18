"""SteeringVector files and training methods on synthetic activations (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vinterp.steering import SteeringVector, fit_direction
from vinterp.steering.train import METHODS


def _planted(paired: bool, hidden: int = 32, seed: int = 0):
    """Activations with a planted direction ``d``: positives at +2d, negatives at -2d, on
    top of shared content (paired prompts) or independent content (unpaired, unequal
    counts); the classes overlap (unit noise), so logistic regression is well-posed."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(hidden, generator=g)
    d = d / d.norm()
    offset = torch.randn(hidden, generator=g) * 3.0
    n, m = (2000, 2000) if paired else (2000, 1200)
    base = torch.randn(n, hidden, generator=g) * 2.0 + offset
    pos = base + 2.0 * d + torch.randn(n, hidden, generator=g)
    neg_base = base[:m] if paired else torch.randn(m, hidden, generator=g) + offset
    neg = neg_base - 2.0 * d + torch.randn(m, hidden, generator=g)
    return d, pos, neg


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("paired", [True, False])
def test_planted_direction_recovered(method, paired):
    d, pos, neg = _planted(paired)
    v = fit_direction(pos, neg, method)
    cos = float(torch.nn.functional.cosine_similarity(v, d, dim=0))
    assert cos >= 0.99, (method, paired, cos)
    # signed toward positive and about as long as the planted difference (2 - -2 = 4)
    assert 3.0 < float(v @ d) < 5.0


def test_unknown_method():
    _, pos, neg = _planted(True)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_direction(pos, neg, "svm")


def _vec(**kw):
    g = torch.Generator().manual_seed(1)
    return SteeringVector({3: torch.randn(16, generator=g), 1: torch.randn(16, generator=g)},
                          model="tiny-llama", method="pca", position="last",
                          prompts_hash="abc", **kw)


def test_save_load_round_trip(tmp_path):
    v = _vec(extra={"note": "x"})
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    assert w.layers == [1, 3] and w.hidden_size == 16
    assert all(torch.equal(v[i], w[i]) for i in v.layers)
    assert (w.model, w.method, w.position, w.prompts_hash) == ("tiny-llama", "pca", "last",
                                                                "abc")
    assert w.extra == {"note": "x"}
    meta = w.metadata()
    assert meta["norms"]["3"] == pytest.approx(float(v[3].norm()))
    # the per-layer format the server's PUT /v1/vectors takes: one tensor per layer index
    assert sorted(load_file(path)) == ["1", "3"]
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left


class _SV:
    """Like steering-vectors' SteeringVector: ``layer_activations`` is layer -> tensor."""

    def __init__(self, acts):
        self.layer_activations = acts


def test_load_foreign_formats(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    # steering-vectors: torch.save(vec.layer_activations); repeng: ControlVector.directions
    torch.save({4: a, 6: b}, tmp_path / "sv.pt")
    v = SteeringVector.load(tmp_path / "sv.pt")
    assert v.layers == [4, 6] and torch.equal(v[4], a)
    rp = SteeringVector.from_dict({4: a.numpy(), 6: b.numpy().astype(np.float32)})
    assert torch.equal(rp[6], b)
    # a safetensors file of per-layer tensors with keys that name the layer
    save_file({"model.layers.4": a, "model.layers.6": b}, str(tmp_path / "x.safetensors"))
    assert SteeringVector.load(tmp_path / "x.safetensors").layers == [4, 6]
    torch.save(_SV({2: a}), tmp_path / "obj.pt")    # the object pickled whole
    assert SteeringVector.load(tmp_path / "obj.pt").layers == [2]


def test_repeng_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.5", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    v = SteeringVector.load(tmp_path / "c.gguf")
    assert v.layers == [5] and v[5].tolist() == list(range(8))


def test_checks_and_interventions():
    v = _vec()
    with pytest.raises(ValueError, match="hidden size 16 but the model's is 64"):
        v.check(64, 4)
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] out of range"):
        v.check(16, 4, [1, 7])
    with pytest.raises(ValueError, match=r"no tensor for layer\(s\) \[2\]"):
        v.check(16, 4, [2])
    with pytest.raises(KeyError, match="has no layer 0"):
        v[0]
    with pytest.raises(ValueError, match="different hidden sizes"):
        SteeringVector({0: torch.zeros(4), 1: torch.zeros(5)})
    named = v.interventions(2.0, name="happy", layers=[3])
    assert named == [{"op": "steer", "layers": [3], "vector": {"name": "happy"}, "scale": 2.0,
                      "positions": "all"}]
    inline = v.interventions(1.0)
    assert [i["layers"] for i in inline] == [[1], [3]]
    assert inline[1]["vector"]["values"] == pytest.approx(v[3].tolist())
    json.dumps(inline)


def test_layer_keys_name_the_layer_after_the_layer_list():
    """A key's layer is the integer after a layer-list name (or a bare integer), not the last
    integer in it: 'model.layers.8.mlp.fc2' is layer 8, not 2 (audit finding 1)."""
    a, b = torch.ones(4), torch.zeros(4)
    v = SteeringVector.from_dict({"model.layers.8.mlp.fc2": a, "model.layers.3.mlp.fc2": b})
    assert v.layers == [3, 8] and torch.equal(v[8], a) and torch.equal(v[3], b)
    assert SteeringVector.from_dict({"transformer.h.8.ln_2": a}).layers == [8]
    # every documented spelling still works
    for key, layer in [(8, 8), ("8", 8), ("layers.8", 8), ("direction.8", 8),
                       ("model.layers.4", 4), ("gpt_neox.layers.5.mlp", 5),
                       ("transformer.blocks.2", 2), ("encoder.layer.1.output", 1),
                       ("layer_7", 7), (torch.tensor(6), 6), (np.int64(9), 9)]:
        assert SteeringVector.from_dict({key: a}).layers == [layer], key


@pytest.mark.parametrize("key", ["fc2", "mlp.c_fc2", "layers.8.sub.layers.2", "weight"])
def test_layer_key_that_cannot_be_settled_is_refused(key):
    with pytest.raises(ValueError, match=r"cannot tell which layer.*rename the key") as e:
        SteeringVector.from_dict({key: torch.ones(4)})
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("keys", [("8", "layers.8"), (8, "model.layers.8.mlp.fc2")])
def test_two_keys_for_one_layer_are_refused(keys, tmp_path):
    with pytest.raises(ValueError, match="both name layer 8") as e:
        SteeringVector.from_dict({keys[0]: torch.ones(4), keys[1]: torch.zeros(4)})
    assert repr(keys[0]) in str(e.value) and repr(keys[1]) in str(e.value)
    with pytest.raises(ValueError, match="both name layer 8"):
        SteeringVector({keys[0]: torch.ones(4), keys[1]: torch.zeros(4)})
    # and through a foreign safetensors file
    save_file({str(k): torch.ones(4) for k in keys}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="both name layer 8"):
        SteeringVector.load(tmp_path / "d.safetensors")
