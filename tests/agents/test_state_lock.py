"""One daemon per state_dir: the lock, its holder's name in the refusal, and its release."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from agents.errors import AgentError
from agents.state_lock import LOCK_NAME, StateDirLock


def test_a_second_holder_is_refused_with_the_first_ones_name_until_it_lets_go(tmp_path):
    first = StateDirLock(tmp_path).acquire()
    assert first.held
    with pytest.raises(AgentError) as refused:
        StateDirLock(tmp_path).acquire()  # another open of the file: refused even in one process
    said = str(refused.value)
    assert f"state_dir {tmp_path} is in use by another beampilot daemon (pid {os.getpid()} on {socket.gethostname()}" in said
    assert "Stop that one first" in said
    assert StateDirLock.holder(tmp_path).startswith(f"pid {os.getpid()} on ")
    first.release()
    first.release()  # idempotent
    assert not first.held and StateDirLock.holder(tmp_path) is None
    again = StateDirLock(tmp_path).acquire()
    assert again.held
    again.release()


def test_looking_for_a_holder_creates_nothing(tmp_path):
    where = tmp_path / "not-yet"
    assert StateDirLock.holder(where) is None
    assert not where.exists()


def test_a_holder_killed_outright_leaves_no_stale_lock(tmp_path):
    """SIGKILL runs no clean-up: the kernel lets the lock go with the process, and the file it
    leaves behind blocks nobody."""
    code = ("import sys, time; from agents.state_lock import StateDirLock; "
            f"StateDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert child.stdout.readline().strip() == "held"
        assert StateDirLock.holder(tmp_path).startswith(f"pid {child.pid} on ")
        with pytest.raises(AgentError, match=f"pid {child.pid} "):
            StateDirLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert (tmp_path / LOCK_NAME).exists()
    deadline = time.monotonic() + 5
    while StateDirLock.holder(tmp_path) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    StateDirLock(tmp_path).acquire().release()


def test_run_check_says_a_daemon_runs_on_the_state_dir(tmp_path):
    from agents.daemon_config import load_daemon_config
    from agents.preflight import _state_dir

    config = load_daemon_config({"agents": [{"kind": "rate", "name": "rate"}], "state_dir": str(tmp_path / "state")})
    (tmp_path / "state").mkdir()
    assert _state_dir(config).status == "ok"
    lock = StateDirLock(tmp_path / "state").acquire()
    try:
        check = _state_dir(config)
    finally:
        lock.release()
    assert check.status == "warn" and f"a daemon runs on it now (pid {os.getpid()} on " in check.detail
    assert "another would be refused at start" in check.detail


def test_run_check_says_the_steering_was_left_held(tmp_path):
    """Someone stopped the queue yesterday: the daemon will leave it stopped; the check says so."""
    import time

    from agents.daemon import Checkpoint
    from agents.daemon_config import load_daemon_config
    from agents.preflight import _state_dir

    config = load_daemon_config({"agents": [{"kind": "rate", "name": "rate"}], "state_dir": str(tmp_path)})
    Checkpoint().save(tmp_path / "checkpoint.json", fsync=False)
    assert _state_dir(config).status == "ok"
    why = "the queue was asked to stop (as 'qserver queue stop' asks)"
    Checkpoint(held={"since": time.time(), "why": why, "stopped": True}).save(tmp_path / "checkpoint.json", fsync=False)
    check = _state_dir(config)
    assert check.status == "warn" and why in check.detail and "'qserver queue start'" in check.detail
