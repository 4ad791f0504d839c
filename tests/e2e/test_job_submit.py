"""`ray job submit` against a real Ray head on 127.0.0.1 (dashboard included): the job merges,
its logs show progress and the report, and its exit status is the merge's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests.conftest import _free_port
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="rmj-", dir="/tmp")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             # Its own agent port: the session's local Ray may hold the default one.
                             "--dashboard-agent-listen-port", str(agent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray head's dashboard did not come up")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)  # the head's whole process tree, by its group: never `ray stop`
    try:
        proc.wait(timeout=5)  # `ray start --block` lingers on SIGTERM (30 s here): a test head needs no more
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _submit(url, env, *args):
    deadline = time.monotonic() + 90
    while True:
        r = subprocess.run([RAY, "job", "submit", "--address", url, "--", sys.executable, "-m", "raymerge", *args],
                           capture_output=True, text=True, env=env, timeout=300)
        # The dashboard answers before its job agent is up (slower on a loaded machine): try again.
        if "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


def test_job_submit_merges_bit_exact_with_progress_in_logs(head, llama_trio, tmp_path):
    url, env = head
    out = str(tmp_path / "out")
    r = _submit(url, env, "merge", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp",
                llama_trio["cp"], "--out", out, "--scale", "0.5", "--shard-size", "100KB", "--item-size", "16KiB")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = r.stdout + r.stderr
    assert "execute: " in logs and "items" in logs and "GB/s" in logs  # progress lines in the job log
    assert "peak memory per worker" in logs  # the run report
    inputs = {role: load_folder(p) for role, p in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))


def test_failed_job_fails_the_submission(head, llama_trio, tmp_path):
    url, env = head
    r = _submit(url, env, "merge", "--base", str(tmp_path / "missing"), "--chat", llama_trio["chat"], "--cp",
                llama_trio["cp"], "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "no such checkpoint" in r.stdout + r.stderr
