"""Workload definitions shared by the driver and every worker.

Everything a worker needs to run a case is built here by the driver (prompts, sizes, layers,
seeds) and shipped to workers as JSON, so every system runs exactly the same inputs. This
module must import in both venvs (.venv and the nnsight-only .bench-venv): standard library
plus torch only, never vinterp or vllm.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Workload names usable with --only, in the order they run.
WORKLOADS: tuple[str, ...] = (
    "steer_generate",
    "concurrency",
    "capture",
    "patch_sweep",
    "many_users",
    "trace_overhead",
)

# The seed's activation-patching pair (issue 3's acceptance example).
CLEAN_PROMPT = "The Eiffel Tower is in the city of"
CORRUPT_PROMPT = "The Colosseum is in the city of"
TARGET_TOKEN = " Paris"

# Words that are single tokens in SmolLM2's tokenizer (checked by the driver when building
# prompts of a given length); used to build deterministic prompts of varied lengths.
_WORDS = (
    "the cat dog house river city king queen music story water light night morning "
    "garden forest mountain ocean train road market school teacher child friend family "
    "letter window door table chair book paper money power music field summer winter "
    "history science language country village island bridge castle doctor artist"
).split()
_OPENERS = (
    "Once upon a time,", "The history of", "In the morning,", "A short story about",
    "My favourite thing about", "Scientists recently found that", "The best way to",
    "Yesterday the", "In a small village,", "The main reason for",
)


@dataclass
class SizeConfig:
    """Sizes of every workload; ``quick`` shrinks them so the run fits in minutes."""

    gen_prompts: int = 64
    gen_new_tokens: int = 64
    capture_prompts: int = 256
    capture_full_layers: tuple[int, ...] = (0, 10, 20, 29)
    # concurrency sweep: steered generation (workload 1c) with this many requests at once;
    # the sweep's top point is steer_generate itself (gen_prompts requests)
    concurrency_levels: tuple[int, ...] = (1, 4, 16)
    sweep_layers: int = 30  # first N layers of the grid (the seed sweeps all of them)
    users: int = 64
    users_min_len: int = 8
    users_max_len: int = 200
    users_min_tokens: int = 16
    users_max_tokens: int = 128
    serial_subset: int = 16  # nnsight one request at a time: timed on this many
    overhead_calls: int = 20  # trace_overhead: calls per repetition (timing per call)
    reps: int = 5

    @classmethod
    def quick(cls) -> SizeConfig:
        return cls(
            gen_prompts=8, gen_new_tokens=16, capture_prompts=16, sweep_layers=4,
            users=8, users_max_len=80, users_min_tokens=8, users_max_tokens=32,
            serial_subset=2, overhead_calls=10, reps=2, concurrency_levels=(1, 4),
        )

    @classmethod
    def warm(cls) -> SizeConfig:
        """The warm-up's inputs: every code path once, at the smallest useful size."""
        return cls(
            gen_prompts=2, gen_new_tokens=4, capture_prompts=4, sweep_layers=1, users=2,
            users_max_len=24, users_min_tokens=2, users_max_tokens=6, serial_subset=1,
            overhead_calls=2, reps=1, concurrency_levels=(1,),
        )


@dataclass
class WorkloadConfig:
    """All inputs of one benchmark run (sent to each worker at setup)."""

    model_path: str
    num_layers: int
    hidden_size: int
    dtype: str = "float32"
    # Where HF-side systems put the model ("cpu", "cuda"); vLLM picks its own platform.
    device: str = "cpu"
    steer_layer: int = 15
    # The norm of every steering vector. smollm2-135m's residual stream has norms of ~60
    # (layer 0) to ~1,700 (late layers): the earlier 4.0 changed no token of 8 quick
    # many_users requests (the per-repetition check caught it); 64 changes most. The compute
    # is the same at any norm.
    steer_scale: float = 64.0
    seed: int = 0
    sizes: SizeConfig = field(default_factory=SizeConfig)
    gen_prompts: list[str] = field(default_factory=list)
    capture_prompts: list[str] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)  # prompt, max_tokens, layer
    kv_cache_bytes: int = 2 << 30

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkloadConfig:
        data = dict(data)
        sizes = dict(data.pop("sizes"))
        sizes["capture_full_layers"] = tuple(sizes["capture_full_layers"])
        sizes["concurrency_levels"] = tuple(sizes["concurrency_levels"])
        return cls(sizes=SizeConfig(**sizes), **data)


def device_map(cfg: WorkloadConfig) -> dict[str, str]:
    """``device_map`` for a from_pretrained-style loader: none on CPU, so CPU runs load the
    model the way every earlier result did."""
    return {"device_map": cfg.device} if cfg.device != "cpu" else {}


def _sentence(rng: random.Random, n_words: int) -> str:
    return rng.choice(_OPENERS) + " " + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def build_config(
    model_path: str, num_layers: int, hidden_size: int, sizes: SizeConfig, count_tokens: Any,
    device: str = "cpu",
) -> WorkloadConfig:
    """Build every workload's inputs deterministically.

    ``count_tokens(text) -> int`` is the model tokenizer's length (with BOS if it adds one);
    many_users prompts are grown word by word until they reach their target length.
    """
    rng = random.Random(0)
    gen = [_sentence(rng, rng.randint(4, 10)) for _ in range(sizes.gen_prompts)]
    cap = [_sentence(rng, rng.randint(6, 20)) for _ in range(sizes.capture_prompts)]
    users = []
    for i in range(sizes.users):
        target = rng.randint(sizes.users_min_len, sizes.users_max_len)
        text = rng.choice(_OPENERS)
        while count_tokens(text) < target:
            text += " " + rng.choice(_WORDS)
        users.append({
            "prompt": text,
            "prompt_tokens": count_tokens(text),
            "max_tokens": rng.randint(sizes.users_min_tokens, sizes.users_max_tokens),
            # Each user steers its own layer with its own vector (row i of user_vectors).
            "layer": rng.randrange(num_layers),
            "index": i,
        })
    return WorkloadConfig(
        model_path=model_path, num_layers=num_layers, hidden_size=hidden_size,
        steer_layer=num_layers // 2, sizes=sizes, gen_prompts=gen, capture_prompts=cap,
        users=users, device=device,
    )


def vectors(cfg: WorkloadConfig, n: int, salt: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` steering vectors of norm ``steer_scale``, identical in every worker and venv."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + salt)
    v = torch.randn(n, cfg.hidden_size, generator=g, dtype=torch.float32)
    v = v / v.norm(dim=-1, keepdim=True) * cfg.steer_scale
    return v.to(dtype=dtype, device=cfg.device)


def layer_vectors(cfg: WorkloadConfig, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[num_layers, n, hidden]`` distinct vectors for the every-layer case (1d)."""
    return torch.stack([vectors(cfg, n, 100 + layer, dtype) for layer in range(cfg.num_layers)])


# Steered-generation cases (issue 5, workload 1).
STEER_CASES = ("none", "shared_1layer", "distinct_1layer", "distinct_all_layers")
# The all-layer case written as nnsight users write it (``output[:] += v`` at every layer and
# step), vinterp's systems only: it must take the same vectorized path as ``.steer()`` (issue 13).
IDIOM_CASES = ("idiom_all_layers",)
