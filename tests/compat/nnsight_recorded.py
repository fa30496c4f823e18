"""nnsight 0.8.1's recorded values (``nnsight_reference.json``, written by ``record_nnsight.py``)
and the tolerance each backend is held to against them."""

from __future__ import annotations

import json
from pathlib import Path

REF = json.loads((Path(__file__).with_name("nnsight_reference.json")).read_text())
# vLLM's CPU kernels differ from HF's in the last bits; HF runs the same ops as nnsight
ATOL = {"hf": 1e-5, "vllm": 1e-3}
