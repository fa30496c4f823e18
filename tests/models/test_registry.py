"""Name resolution: local dirs, known names, and the offline error for anything else."""

from __future__ import annotations

import time

import pytest

from vinterp.models import KNOWN_MODELS, ModelNotFoundError, list_models, resolve_model


def test_local_directory_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_known_name_resolves_to_cache(smollm2_path):
    assert resolve_model("smollm2-135m") == smollm2_path
    assert (smollm2_path / "config.json").is_file()


def test_unknown_name_gives_offline_error_fast():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("meta-llama/Llama-3-8B")
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, "no network attempt should be made"
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'meta-llama/Llama-3-8B'" in msg
    assert "neither a known vinterp model nor a local directory" in msg
    assert "vinterp models pull" in msg
    assert "local Hugging Face model directory" in msg
    for name in KNOWN_MODELS:
        assert name in msg


def test_known_but_not_pulled_with_pull_false(tmp_path, monkeypatch):
    monkeypatch.setenv("VINTERP_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="vinterp models pull tiny-llama"):
        resolve_model("tiny-llama", pull=False)


def test_list_models_reports_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("VINTERP_HOME", str(tmp_path))
    rows = list_models()
    assert [r["name"] for r in rows] == list(KNOWN_MODELS)
    for r in rows:
        assert r["path"] == str(tmp_path / "models" / r["name"])
        assert r["provisioned"] is False
        assert r["description"]
