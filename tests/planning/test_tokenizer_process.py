"""The tokenizer process: kept between builds under the same environment and directory, a new one
under others, ended when idle, and a killed one reported in one line and replaced."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from raymerge.errors import ResolveError
from raymerge.planning import tokenizer_process
from tests.helpers import wait_for


@pytest.fixture
def fresh():
    """No process kept from an earlier test, and none left for a later one."""
    tokenizer_process.end()
    yield
    tokenizer_process.end()


def test_builds_in_a_row_share_one_process_under_the_drivers_environment_of_now(fresh, monkeypatch, tmp_path):
    first = tokenizer_process.run(os.getpid)
    assert first != os.getpid() and tokenizer_process.run(os.getpid) == first
    monkeypatch.setenv("RAYMERGE_TEST_TOKENIZER_ENV", "changed")  # read when the build reads it
    monkeypatch.chdir(tmp_path)  # relative paths: the driver's directory of now
    assert tokenizer_process.run(os.getenv, "RAYMERGE_TEST_TOKENIZER_ENV") == "changed"
    assert tokenizer_process.run(os.getcwd) == str(tmp_path) and tokenizer_process.run(os.getpid) == first
    monkeypatch.delenv("RAYMERGE_TEST_TOKENIZER_ENV")
    assert tokenizer_process.run(os.getenv, "RAYMERGE_TEST_TOKENIZER_ENV") is None


@pytest.mark.parametrize("name", ["HF_ENDPOINT", "AWS_ENDPOINT_URL", "https_proxy"])
def test_a_variable_libraries_read_once_gets_a_new_process(fresh, monkeypatch, name):
    first = tokenizer_process.run(os.getpid)
    monkeypatch.setenv(name, "http://127.0.0.1:9")
    assert tokenizer_process.run(os.getpid) != first
    assert wait_for(lambda: _gone(first), 30)  # the old one ended


def test_an_idle_process_ends(fresh, monkeypatch):
    monkeypatch.setattr(tokenizer_process, "IDLE", 0.2)
    pid = tokenizer_process.run(os.getpid)
    assert wait_for(lambda: _gone(pid), 30)
    assert tokenizer_process.run(os.getpid) != pid


def test_only_the_timer_of_the_last_build_ends_the_process(fresh, monkeypatch):
    """Timers held here and fired by hand: one armed before a later build ends nothing."""
    timers = []

    class Held:
        def __init__(self, _delay, fn, args):
            timers.append(lambda: fn(*args))
            self.daemon = False

        def start(self):
            pass

    monkeypatch.setattr(tokenizer_process.threading, "Timer", Held)
    pid = tokenizer_process.run(os.getpid)
    assert tokenizer_process.run(os.getpid) == pid
    timers[0]()  # the first build's: idle no longer
    assert tokenizer_process.run(os.getpid) == pid
    timers[-1]()  # the last build's, with none since
    assert wait_for(lambda: _gone(pid), 30) and tokenizer_process.run(os.getpid) != pid


def test_a_killed_process_is_one_line_and_the_next_build_gets_a_new_one(fresh):
    pid = tokenizer_process.run(os.getpid)
    with pytest.raises(ResolveError, match=r"^tokenizer: the process building it was killed .*run the command again$"):
        tokenizer_process.run(os.kill, pid, signal.SIGKILL)
    assert tokenizer_process.run(os.getpid) != pid


def test_what_the_build_raises_reaches_the_driver(fresh):
    with pytest.raises(FileNotFoundError):
        tokenizer_process.run(os.listdir, "/nonexistent-raymerge-folder")
    assert tokenizer_process.run(os.getpid) != os.getpid()  # the process goes on


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
