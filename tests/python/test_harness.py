"""The harness itself: a run is up once it answers, each run has its own connection
pool, and a failure or a server that died on its own says so with the server's log."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from harness import DoloresServer, ServerFailed


def test_each_run_has_its_own_pool_and_answers_when_restart_returns(tmp_path):
    server = DoloresServer(data=tmp_path / "data").start()
    try:
        first = server.http
        assert first is not None and server.get_json("/healthz")["status"] == "ok"
        server.kill()
        assert first.is_closed and server.http is None
        server.restart()
        assert server.http is not None and server.http is not first
        # No wait, no retry: restart() returned once /healthz answered through this pool.
        assert server.get_json("/healthz")["status"] == "ok"
        assert server.stop() == 0
        assert server.http is None
    finally:
        server.close()


def test_a_call_to_a_server_that_is_not_running_fails_with_its_log(tmp_path):
    server = DoloresServer(data=tmp_path / "data").start()
    try:
        server.kill()
        with pytest.raises(ServerFailed) as caught:
            server.get_json("/api/v1/stats")
        message = str(caught.value)
        assert "the server is not running (exit code -9)" in message
        assert "---- dolores run 1 stderr ----" in message
    finally:
        server.close()


def test_a_server_that_cannot_start_fails_with_its_stderr():
    with pytest.raises(ServerFailed) as caught:
        DoloresServer(heartbeat="not-a-duration").start()
    message = str(caught.value)
    assert "dolores did not start" in message and "exited with" in message
    assert "not-a-duration" in message, "the server's own words are shown"


def test_a_server_that_dies_on_its_own_fails_the_test_at_teardown(tmp_path):
    server = DoloresServer(data=tmp_path / "data").start()
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)  # not through the harness: a crash
    server.process.wait(10)
    with pytest.raises(ServerFailed) as caught:
        server.close()
    assert "run 1 exited by itself with -9" in str(caught.value)


def test_a_run_that_panicked_fails_the_test_at_teardown():
    server = DoloresServer().start()
    assert server.stop() == 0
    # A panic cannot be provoked from outside: write one into the run's stderr, as
    # Rust's panic hook would (once the run has ended, so it writes over nothing).
    with open(Path(server._tmp) / "stderr-1", "a") as stderr:
        stderr.write("thread 'tokio-runtime-worker' panicked at src/hub.rs:1:1:\nboom\n")
    with pytest.raises(ServerFailed) as caught:
        server.close()
    assert "run 1 panicked" in str(caught.value) and "boom" in str(caught.value)
