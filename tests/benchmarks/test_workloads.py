"""Workload inputs: deterministic, the sizes they claim, and the same vectors in every worker."""

from __future__ import annotations

import torch

from benchmarks.workloads import SizeConfig, WorkloadConfig, build_config, layer_vectors, vectors


def count_words(text: str) -> int:  # stands in for the tokenizer: one token per word
    return len(text.split())


def make(sizes: SizeConfig) -> WorkloadConfig:
    return build_config("/model", num_layers=30, hidden_size=8, sizes=sizes,
                        count_tokens=count_words)


def test_inputs_are_deterministic_and_sized() -> None:
    a, b = make(SizeConfig()), make(SizeConfig())
    assert a.to_json() == b.to_json()
    assert len(a.gen_prompts) == 64 and len(a.capture_prompts) == 256 and len(a.users) == 64
    for u in a.users:
        assert a.sizes.users_min_len <= u["prompt_tokens"] == count_words(u["prompt"])
        assert u["prompt_tokens"] <= a.sizes.users_max_len + 1  # grown one word at a time
        assert a.sizes.users_min_tokens <= u["max_tokens"] <= a.sizes.users_max_tokens
        assert 0 <= u["layer"] < 30


def test_config_round_trips_through_json() -> None:
    cfg = make(SizeConfig.quick())
    again = WorkloadConfig.from_json(cfg.to_json())
    assert again == cfg


def test_warm_sizes_are_smaller_than_quick_in_every_dimension() -> None:
    warm, quick = SizeConfig.warm(), SizeConfig.quick()
    for name in ("gen_prompts", "gen_new_tokens", "capture_prompts", "sweep_layers", "users",
                 "serial_subset", "overhead_calls"):
        assert 0 < getattr(warm, name) <= getattr(quick, name), name


def test_vectors_same_everywhere_with_the_steering_norm() -> None:
    cfg = make(SizeConfig.quick())
    v = vectors(cfg, 5, salt=1, dtype=torch.float32)
    assert v.shape == (5, 8)
    torch.testing.assert_close(v.norm(dim=-1), torch.full((5,), cfg.steer_scale))
    torch.testing.assert_close(v, vectors(cfg, 5, salt=1, dtype=torch.float32))
    assert not torch.allclose(v, vectors(cfg, 5, salt=2, dtype=torch.float32))
    lv = layer_vectors(cfg, 3, torch.bfloat16)
    assert lv.shape == (30, 3, 8) and lv.dtype == torch.bfloat16
    assert v.device.type == cfg.device == "cpu"
