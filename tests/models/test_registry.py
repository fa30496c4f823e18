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
    # Pulls build in a temporary directory renamed into place: nothing half-built is left.
    assert not list(smollm2_path.parent.glob(".tmp-*"))


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


_builds: list[str] = []


def _fake_builder(out_dir):
    _builds.append(str(out_dir))
    time.sleep(0.3)  # long enough for a concurrent pull to wait on the lock
    (out_dir / "config.json").write_text("{}")


def _failing_builder(out_dir):
    (out_dir / "model.safetensors").write_text("half")
    raise RuntimeError("interrupted")


def _fake_spec(monkeypatch, tmp_path, builder):
    from vinterp.models import registry

    monkeypatch.setenv("VINTERP_HOME", str(tmp_path))
    spec = registry.ModelSpec("fake", "test model", f"{__name__}:{builder}")
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", spec)
    return registry


def test_concurrent_pulls_build_once(tmp_path, monkeypatch):
    import threading

    registry = _fake_spec(monkeypatch, tmp_path, "_fake_builder")
    _builds.clear()
    threads = [threading.Thread(target=registry.pull, args=("fake",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_builds) == 1
    assert resolve_model("fake", pull=False) == tmp_path / "models" / "fake"


def test_failed_pull_leaves_nothing(tmp_path, monkeypatch):
    registry = _fake_spec(monkeypatch, tmp_path, "_failing_builder")
    with pytest.raises(RuntimeError, match="interrupted"):
        registry.pull("fake")
    assert not registry.is_provisioned("fake")
    assert not (tmp_path / "models" / "fake").exists()
    assert not list((tmp_path / "models").glob(".tmp-*"))
