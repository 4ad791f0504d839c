"""Cluster reality on a real Ray: a node that does not share the driver's filesystem, a disk that
fills up mid-run, and the private local Ray's token authentication."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.e2e.test_safety import SLOW, _args, _env, _journaled, _one_error_line, _reference, _run, _start
from tests.helpers import assert_bit_identical, load_folder, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("mount") is not None


needs_root = pytest.mark.skipif(not _can_mount(), reason="needs root for mount namespaces and tmpfs")


@needs_root
def test_a_node_without_the_drivers_folders_is_refused_before_any_work(llama_trio, tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    script = os.path.join(os.path.dirname(__file__), "scripts", "node_view.py")
    r = subprocess.run([sys.executable, script, llama_trio["base"], llama_trio["chat"], llama_trio["cp"],
                        str(private), str(tmp_path / "out2")], capture_output=True, text=True, env=_env(),
                       timeout=400, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    results = json.loads(line[len("RESULT "):])
    kind, message, left = results["out"]
    assert kind == "NodeViewError", results
    assert f"does not see the output folder {private}/out as the driver does" in message
    assert "node 127.0.0.1 (" in message and "s3://" in message and "--resume" not in message
    assert not left  # nothing staged, nothing left: the refusal came before any work
    kind, message, left = results["input"]
    assert kind == "NodeViewError", results
    assert f"cannot read the input {private}/cp/" in message and "--resume" not in message
    assert not left


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of its own, 4 MB."""
    if not _can_mount():
        pytest.skip("needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path) -> None:
    """Write until the disk is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@needs_root
def test_a_disk_too_small_is_refused_before_any_work(llama_trio, small_disk):
    _fill(small_disk / "filler")
    os.remove(small_disk / "filler")
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (4 * 2**20 - 64 * 1024))  # leave 64 KiB free
    line = _one_error_line(_run(_args(llama_trio, str(small_disk / "out"))), 2)
    assert "GB of free space for the staged shards, the disk has" in line
    assert not (small_disk / "out").exists()


@needs_root
def test_a_disk_that_fills_mid_run_then_resume(llama_trio, small_disk, ray_local, cli_main, capsys):
    """A run (a process of its own) fails in one line when the disk fills; once there is room,
    `--resume` (here, in this process on the session's Ray) finishes it bit for bit."""
    out = str(small_disk / "out")
    proc = _start(_args(llama_trio, out), **SLOW)
    try:
        assert wait_for(lambda: _journaled(out) >= 2 or proc.poll() is not None)
        _fill(small_disk / "filler")  # someone else fills the disk
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = proc.stderr.read().strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("raymerge: error:"), lines[-5:]
    assert "the disk is full" in lines[-1] and "free at least" in lines[-1] and "then run the same command with --resume" in lines[-1]
    os.remove(small_disk / "filler")
    assert cli_main(_args(llama_trio, out, "--resume")) == 0, capsys.readouterr().err[-3000:]
    assert_bit_identical(load_folder(out), _reference(llama_trio))


def test_the_private_local_ray_refuses_other_users_without_its_token(tmp_path):
    """With RAY_AUTH_MODE unset (Ray's default), the embedded Ray takes a token only this
    process's environment holds: a client without it cannot join; one with it can."""
    owner = (
        "import os, sys, time\n"
        "from raymerge.execution.session import prefer_loopback, ray_session\n"
        "prefer_loopback(None)\n"
        "import ray\n"
        "with ray_session(None):\n"
        "    print(ray.get_runtime_context().gcs_address, os.environ['RAY_AUTH_TOKEN'], flush=True)\n"
        "    sys.stdin.read()\n")
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = tempfile.mkdtemp(dir=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    proc = subprocess.Popen([sys.executable, "-c", owner], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        address, token = proc.stdout.readline().split()
        join = f"import ray; ray.init(address='{address}'); print('JOINED', flush=True)"
        # The intruder asks the cluster's GCS directly (ray.init without the token retries for 20 s
        # before it gives up the same way).
        ask = (f"from ray._raylet import GcsClient; GcsClient(address='{address}').internal_kv_keys(b'', None, "
               "timeout=10); print('JOINED', flush=True)")
        intruder = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, env=env, timeout=120)
        assert intruder.returncode != 0 and "JOINED" not in intruder.stdout
        assert "InvalidAuthToken" in intruder.stderr or "uthentication" in intruder.stderr, intruder.stderr[-2000:]
        friend = subprocess.run([sys.executable, "-c", join], capture_output=True, text=True, timeout=120,
                                env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert "JOINED" in friend.stdout, friend.stderr[-2000:]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(env["HOME"], ".ray", "auth_token"))  # no token left in a file
