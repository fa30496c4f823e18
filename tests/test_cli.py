"""The `vinterp` CLI: models list / pull, and clean errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from vinterp.cli import main

CLI = [sys.executable, "-m", "vinterp.cli"]


def test_models_list_shows_names_and_paths(tmp_path):
    env = {**os.environ, "VINTERP_HOME": str(tmp_path)}
    proc = subprocess.run([*CLI, "models", "list"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in ["smollm2-135m", "tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2",
                 "tiny-gptneox"]:
        assert name in proc.stdout
        assert str(tmp_path / "models" / name) in proc.stdout


def test_models_list_shows_provisioned(smollm2_path, capsys):
    assert main(["models", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "smollm2-135m" in ln)
    assert "ready" in line and str(smollm2_path) in line


def test_pull_unknown_model_exit_2_on_stderr(tmp_path):
    env = {**os.environ, "VINTERP_HOME": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.run([*CLI, "models", "pull", "gpt-5"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 2
    assert proc.stderr.startswith("vinterp: error: model 'gpt-5' is neither a known vinterp")
    assert "vinterp models pull" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_pull_known_model_is_quick_when_present(smollm2_path, capsys):
    assert main(["models", "pull", "smollm2-135m"]) == 0
    assert str(smollm2_path) in capsys.readouterr().out


def test_serve_refuses_replica_and_shard_counts_below_one(capsys):
    """Checked before anything starts (no engine, no Ray); a negative shutdown grace too."""
    sigterm = signal.getsignal(signal.SIGTERM)   # (serve takes SIGTERM over)
    try:
        for flag in ("--replicas", "--ingress-replicas", "--store-shards"):
            start = time.monotonic()
            assert main(["serve", flag, "0"]) == 2
            assert time.monotonic() - start < 5
            assert f"vinterp serve: {flag} 0: use 1 or more" in capsys.readouterr().err
        assert main(["serve", "--shutdown-timeout", "-5"]) == 2
        assert "--shutdown-timeout -5: use 0 or more seconds" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_serve_refuses_a_store_path_it_would_misread(tmp_path, capsys):
    """A store directory split another way, or a file that is not a store, is refused before
    anything starts, with what to do about it."""
    from vinterp_server.sqlite_store import SqliteStore, shard_files

    for f in shard_files(tmp_path / "two", 2):
        SqliteStore(f).close()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store-0-of-1.sqlite").write_bytes(b"not sqlite" * 200)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        start = time.monotonic()
        assert main(["serve", "--store-path", str(tmp_path / "two")]) == 2
        assert "split 2 way(s), not 1" in capsys.readouterr().err
        assert main(["serve", "--store-path", str(tmp_path / "junk")]) == 2
        assert "not a database" in capsys.readouterr().err
        assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_serve_refuses_vllms_api_key_option_without_echoing_it():
    """vLLM's ``--api-key KEY`` was expanded to vinterp's ``--api-keys FILE`` (an argparse
    abbreviation), so the key was read as a file name and printed in a traceback. Refused
    before anything starts, saying what vinterp takes instead."""
    for argv in (["--api-key", "sk-secret-1234"], ["--api-key=sk-secret-1234"]):
        start = time.monotonic()
        proc = subprocess.run([*CLI, "serve", *argv], capture_output=True, text=True,
                              timeout=60)
        assert time.monotonic() - start < 30      # no engine was started
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("vinterp serve: --api-key is vLLM's option")
        assert "--api-keys FILE" in lines[0] and "VINTERP_API_KEYS" in lines[0]
        assert "sk-secret" not in proc.stderr + proc.stdout


def test_serve_takes_no_abbreviation_of_its_options():
    """Options vinterp does not know go to vLLM, so a prefix of one of vinterp's must go
    there too, not be taken as vinterp's (``--ingress 2`` was ``--ingress-replicas 2``)."""
    from vinterp.cli import build_parser

    args, rest = build_parser().parse_known_args(["serve", "--ingress", "2", "--api-key",
                                                   "sk-x-12345678"])
    assert args.ingress_replicas == 1 and args.api_keys is None
    assert rest == ["--ingress", "2", "--api-key", "sk-x-12345678"]


def test_serve_refuses_a_bad_key_file_in_one_line(tmp_path):
    """A key file's mistake (a key too short, a missing file) is one line naming the file and
    line, and exit code 2, before any engine starts (it was a traceback)."""
    bad = tmp_path / "keys.txt"
    bad.write_text("sk-ok-123456789 alice\nshort bob\n")
    for path, expect in ((bad, f"key file {bad}, line 2"),
                         (tmp_path / "missing.txt", "No such file")):
        start = time.monotonic()
        proc = subprocess.run([*CLI, "serve", "--api-keys", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert time.monotonic() - start < 30
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vinterp serve: "), proc.stderr
        assert expect in lines[0] and "short" not in lines[0]
