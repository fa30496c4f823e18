"""``SteeringVector``: one steering direction per decoder layer, plus where it came from.

Saved as one safetensors file: a tensor per layer named by the layer's index (``"8"``,
``"9"``, ...; exactly the per-layer format ``PUT /v1/vectors/{name}`` takes) and the metadata
as JSON in the file's header (``__metadata__["vinterp_steering"]``).

Example::

    vec = SteeringVector.load("happy.safetensors")          # ours, or a layer -> tensor file
    with model.generate("Tell me about your day", max_new_tokens=20):
        vec.apply(model, scale=4.0)                          # every layer the vector has
        # or one layer by hand: model.layers[8].output.steer(vec[8], scale=4.0)
    vec.upload("http://127.0.0.1:8000", "happy")            # a named vector on a server
    body["interventions"] = vec.interventions(scale=4.0, name="happy", layers=[8])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

META_KEY = "vinterp_steering"
FORMAT_VERSION = 1


def prompts_hash(*groups: Iterable[str]) -> str:
    """A short, stable hash of prompt lists (records which prompts trained a vector)."""
    h = hashlib.sha256()
    for group in groups:
        h.update(json.dumps(list(group), ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# Names of the module lists that hold decoder layers (``model.layers``, ``gpt_neox.layers``,
# GPT-2's ``transformer.h``, MPT's ``transformer.blocks``, BERT's ``encoder.layer``) and
# repeng's ``direction.N``. A key's layer is the integer right after one of these, never just
# any integer in it: module paths end in names such as ``fc2`` or ``ln_2`` whose digit is not
# a layer, and reading it as one would steer the wrong layer without a word.
_LAYER_LISTS = frozenset({"layers", "layer", "h", "blocks", "block", "direction",
                          "directions"})
_INT_RE = re.compile(r"-?\d+")
_SEP_RE = re.compile(r"[./_:]")   # ``model.layers.8``, ``layer_8``, ``layers/8``


def layer_of(key: Any) -> int:
    """The layer a per-layer tensor's key names: an int, a bare integer (``8``, ``"8"``), or
    the integer after a layer-list component (``"layers.8"``, ``"model.layers.8.mlp.fc2"``,
    ``"transformer.h.8"``, ``"direction.8"``). Raises ``ValueError`` for any other key.

    Example::

        >>> layer_of("model.layers.8.mlp.fc2")
        8
    """
    if isinstance(key, int):
        return key
    if isinstance(key, torch.Tensor) and key.dim() == 0:
        return int(key)
    text = str(key).strip()
    if _INT_RE.fullmatch(text):
        return int(text)
    parts = [p for p in _SEP_RE.split(text) if p]
    found = {int(parts[i + 1]) for i in range(len(parts) - 1)
             if parts[i].lower() in _LAYER_LISTS and _INT_RE.fullmatch(parts[i + 1])}
    if len(found) == 1:
        return found.pop()
    ints = [int(x) for x in _INT_RE.findall(text)]
    why = (f"it names several layers {sorted(found)}" if found else
           f"its integers {ints} follow no layer-list name (layers, h, blocks, layer, "
           "direction)" if ints else "it holds no layer number")
    raise ValueError(f"cannot tell which layer the tensor under key {key!r} is for: {why}; "
                     "rename the key to the layer's index, e.g. '8' or 'layers.8' (or "
                     "'model.layers.8.mlp' for a module path)")


def by_layer(items: Iterable[tuple[Any, Any]]) -> dict[int, Any]:
    """``{layer: value}`` from ``(key, value)`` pairs; two keys for one layer raise instead
    of one silently replacing the other."""
    out: dict[int, Any] = {}
    keys: dict[int, Any] = {}
    for k, v in items:
        layer = layer_of(k)
        if layer in out:
            raise ValueError(f"keys {keys[layer]!r} and {k!r} both name layer {layer}; keep "
                             "one tensor per layer (drop or rename one of them)")
        out[layer], keys[layer] = v, k
    return out


@dataclass
class SteeringVector:
    """Per-layer steering directions (``vectors[layer]``: a float32 ``[hidden]`` tensor) and
    metadata: the model, method, position, training prompts' hash and anything else in
    ``extra``. ``vec[layer]`` is that layer's tensor (usable in ``.steer(vec[layer])``)."""

    vectors: dict[int, torch.Tensor]
    model: str | None = None
    method: str | None = None
    position: str | None = None
    prompts_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("a steering vector needs at least one layer")
        clean: dict[int, torch.Tensor] = {}
        for k, v in by_layer(self.vectors.items()).items():
            t = torch.as_tensor(v).detach().to("cpu", torch.float32)
            if t.dim() == 2 and t.shape[0] == 1:
                t = t[0]
            if t.dim() != 1:
                raise ValueError(f"layer {k}: a steering vector is one [hidden] tensor per "
                                 f"layer, got shape {list(t.shape)}")
            clean[k] = t.contiguous()
        sizes = {t.shape[0] for t in clean.values()}
        if len(sizes) != 1:
            raise ValueError(f"layers have different hidden sizes: {sorted(sizes)}")
        self.vectors = dict(sorted(clean.items()))

    # ------------------------------------------------------------------ views
    @property
    def layers(self) -> list[int]:
        return list(self.vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in self.vectors.items()}

    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            return self.vectors[int(layer)]
        except KeyError:
            raise KeyError(f"this steering vector has no layer {layer}; it has layers "
                           f"{self.layers}") from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.vectors

    def __repr__(self) -> str:
        return (f"SteeringVector(layers={self.layers}, hidden_size={self.hidden_size}, "
                f"model={self.model!r}, method={self.method!r})")

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-able data."""
        return {"format": FORMAT_VERSION, "model": self.model, "method": self.method,
                "position": self.position, "layers": self.layers,
                "hidden_size": self.hidden_size, "norms": {str(k): v for k, v in
                                                           self.norms.items()},
                "prompts_hash": self.prompts_hash, "extra": self.extra}

    def check(self, hidden_size: int, num_layers: int, layers: Iterable[int] | None = None
              ) -> list[int]:
        """Check the vector against a model's sizes; returns the layers to use (``layers``
        or all of the vector's). Raises ``ValueError`` with what is wrong."""
        if self.hidden_size != hidden_size:
            raise ValueError(f"the steering vector has hidden size {self.hidden_size} but the "
                             f"model's is {hidden_size} (was it trained on another model? "
                             f"its metadata says model={self.model!r})")
        use = list(self.layers if layers is None else layers)
        if not use:
            raise ValueError("no layers to steer")
        bad = [i for i in use if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: the model has {num_layers} "
                             f"layers (0..{num_layers - 1})")
        missing = [i for i in use if int(i) not in self.vectors]
        if missing:
            raise ValueError(f"the steering vector has no tensor for layer(s) {missing}; it "
                             f"has layers {self.layers}")
        return [int(i) for i in use]

    # ------------------------------------------------------------------ use
    def apply(self, model: Any, scale: float = 1.0, positions: Any = None,
              layers: Iterable[int] | None = None) -> None:
        """Inside a trace: ``model.layers[i].output.steer(self[i], scale, positions)`` for each
        of ``layers`` (default: all of the vector's)."""
        cfg = model.config
        use = self.check(cfg.hidden_size, cfg.num_hidden_layers, layers)
        for i in use:
            model.layers[i].output.steer(self[i], scale=scale, positions=positions)

    def interventions(self, scale: float = 1.0, *, name: str | None = None,
                      layers: Iterable[int] | None = None, positions: Any = "all"
                      ) -> list[dict[str, Any]]:
        """The server's ``interventions`` field for this vector: with ``name`` (after
        :meth:`upload`) one op that picks each layer's tensor from the named vector;
        without, one op per layer with the values inline."""
        use = self.layers if layers is None else [int(i) for i in layers]
        for i in use:
            self[i]   # noqa: B018 - raises for a missing layer
        if name is not None:
            return [{"op": "steer", "layers": use, "vector": {"name": name},
                     "scale": float(scale), "positions": positions}]
        return [{"op": "steer", "layers": [i], "vector": {"values": self[i].tolist()},
                 "scale": float(scale), "positions": positions} for i in use]

    def to_bytes(self) -> bytes:
        """The safetensors file (per-layer tensors + JSON metadata) as bytes."""
        from safetensors.torch import save

        return save({str(k): v for k, v in self.vectors.items()},
                    metadata={META_KEY: json.dumps(self.metadata())})

    def upload(self, url: str, name: str, api_key: str | None = None,
               timeout: float = 60.0) -> dict[str, Any]:
        """``PUT /v1/vectors/{name}`` on a vinterp server (per-layer format); returns the
        server's answer. ``api_key`` defaults to ``VINTERP_API_KEY``."""
        import httpx

        key = api_key if api_key is not None else os.environ.get("VINTERP_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        base = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        r = httpx.put(f"{base}/v1/vectors/{name}", content=self.to_bytes(), headers=headers,
                      timeout=timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"uploading vector {name!r} failed ({r.status_code}): {r.text}")
        return r.json()

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the safetensors file atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(self.to_bytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_dict(cls, vectors: Mapping[Any, Any], **meta: Any) -> SteeringVector:
        """From a ``layer -> tensor`` dict, as repeng (``ControlVector.directions``) and
        steering-vectors (``SteeringVector.layer_activations``) keep them; numpy arrays work."""
        return cls(by_layer(vectors.items()), **meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        """Read a vector: our safetensors file, a safetensors file of per-layer tensors
        (keys naming the layer: ``8``, ``layers.8``, ``model.layers.8.mlp``,
        ``transformer.h.8``, ``direction.8``), a ``torch.save``d dict
        of layer -> tensor (steering-vectors' ``layer_activations``, repeng's
        ``directions``), a steering-vectors/repeng object with those attributes, or
        repeng's ``.gguf`` export."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no steering vector file at {path}")
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return cls._load_gguf(path)
        if suffix in (".pt", ".pth", ".bin"):
            obj = torch.load(path, map_location="cpu", weights_only=False)
            for attr in ("layer_activations", "directions"):
                if hasattr(obj, attr):
                    obj = getattr(obj, attr)
            if not isinstance(obj, Mapping):
                raise ValueError(f"{path}: expected a dict of layer -> tensor, got "
                                 f"{type(obj).__name__}")
            return cls.from_dict(obj, extra={"source": str(path)})
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:   # safetensors raises its own error types
            raise ValueError(f"{path} is not a safetensors file: {exc}") from None
        if not tensors:
            raise ValueError(f"{path} holds no tensor")
        if META_KEY in header:
            meta = json.loads(header[META_KEY])
            return cls(tensors, model=meta.get("model"),
                       method=meta.get("method"), position=meta.get("position"),
                       prompts_hash=meta.get("prompts_hash"), extra=meta.get("extra") or {})
        return cls.from_dict(tensors, extra={"source": str(path)})

    @classmethod
    def _load_gguf(cls, path: Path) -> SteeringVector:
        import gguf

        reader = gguf.GGUFReader(str(path))
        vectors = {}
        for t in reader.tensors:
            if t.name.startswith("direction."):
                vectors[int(t.name.split(".")[1])] = torch.tensor(t.data.copy())
        if not vectors:
            raise ValueError(f"{path}: no repeng 'direction.N' tensors in this gguf file")
        return cls(vectors, extra={"source": str(path)})
