"""The remote backend's client side when the server cannot be reached: every call raises
:class:`RemoteError`, never a raw ``httpx`` exception (tests against the real server:
tests/server/test_remote_wait.py)."""

from __future__ import annotations

import time

import pytest

from vinterp.backends.remote import RemoteBackend, RemoteError, RemoteTrace

DOWN = "http://127.0.0.1:1"       # nothing listens on port 1: connection refused


def test_status_of_an_unreachable_server_is_a_remote_error():
    with pytest.raises(RemoteError, match=f"cannot reach the vinterp server at {DOWN}") as err:
        RemoteTrace(RemoteBackend(DOWN), "trace-0").status()
    assert err.value.status == 503


def test_wait_retries_an_unreachable_server_until_its_timeout():
    """One refused poll no longer ends the wait (a restarting server refuses for a while):
    it keeps trying, then gives up at the timeout saying what it last saw."""
    start = time.monotonic()
    with pytest.raises(RemoteError) as err:
        RemoteTrace(RemoteBackend(DOWN), "trace-0").wait(timeout=1.5)
    took = time.monotonic() - start
    assert 1.5 <= took < 6, took
    assert err.value.status == 503
    assert str(err.value).startswith("trace trace-0: gave up after 1.5 s without a status; "
                                     f"last: cannot reach the vinterp server at {DOWN}")


def test_wait_without_a_timeout_ends_when_the_server_stays_away(monkeypatch):
    """With no timeout a wait rides out a restart, but not a server that never comes back
    (``vinterp steer eval --server`` would hang for good): after MAX_OUTAGE_S it gives up."""
    import vinterp.backends.remote as remote

    monkeypatch.setattr(remote, "MAX_OUTAGE_S", 1.0)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="retrying until the server answers"):
        with pytest.raises(RemoteError, match="no status for 1 s, giving up") as err:
            RemoteTrace(RemoteBackend(DOWN), "trace-0").wait()
    assert err.value.status == 503 and time.monotonic() - start < 10


def test_a_failed_trace_keeps_the_servers_status():
    """A failed trace's status object carries its HTTP status (``code``: 413 too large, 429
    a limit, 503 the server stopped); RemoteError.status is that, not always 500. A server
    that sends no code still gives 500."""
    from vinterp.backends.remote import _result

    for code, want in ((413, 413), (503, 503), (None, 500)):
        with pytest.raises(RemoteError, match="the trace failed on the server: why") as err:
            _result({"status": "failed", "error": "why", "code": code})
        assert err.value.status == want
