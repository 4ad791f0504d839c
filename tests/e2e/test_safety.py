"""Trust on a real Ray: no input harmed, an older checkpoint replaced only at commit, one run per
output, a moved or damaged journal handled, inf/NaN never committed silently, workers that die
while starting replaced. Every finished output is compared bit for bit with the reference."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file

import raymerge
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder, own_processes, wait_for, weighted_reference

STAGING = ".raymerge-staging"
SLOW = {"RAYMERGE_TEST_ITEM_DELAY": "0.25"}
# A run that lasts (71 items, two workers: about 21 s) while other drivers start beside it, each
# taking seconds to reach the lease on a loaded machine (the suite runs in two processes).
LASTING = {"RAYMERGE_TEST_ITEM_DELAY": "0.6"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


def _args(trio, out, *extra, scale="0.5", shard_size="100KB") -> list[str]:
    return ["merge", "--base", trio["base"], "--chat", trio["chat"], "--cp", trio["cp"], "--out", out,
            "--scale", scale, "--item-size", "4KiB", "--shard-size", shard_size, "--workers", "2", *extra]


def _merge(trio, out, **kw):
    """The same merge as `_args`, through the Python API on the session's Ray (no Ray start-up)."""
    options = dict(scale=0.5, item_size="4KiB", shard_size="100KB", workers=2)
    options.update(kw)
    return raymerge.merge(trio["base"], trio["chat"], trio["cp"], out, **options)


def _run(args, **env):
    return subprocess.run([sys.executable, "-m", "raymerge", *args], capture_output=True, text=True,
                          env=_env(**env), timeout=300)


def _start(args, **env):
    return subprocess.Popen([sys.executable, "-m", "raymerge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(**env), start_new_session=True)


def _journaled(out: str) -> int:
    folder = os.path.join(out, STAGING)
    if not os.path.isdir(folder):
        return 0
    total = 0
    for n in os.listdir(folder):
        if n.startswith("journal-0"):
            try:
                total += len(json.load(open(os.path.join(folder, n))))
            except (OSError, ValueError):
                pass
    return total


def _kill_when_journaled(proc, out, items=4) -> None:
    """SIGKILL the driver (and the local Ray it started) once `items` are journaled."""
    try:
        assert wait_for(lambda: _journaled(out) >= items or proc.poll() is not None), "too slow"
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _digest(folder) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def _reference(trio, scale=0.5):
    inputs = {role: load_folder(p) for role, p in trio.items()}
    return chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], scale)


def _one_error_line(r, code: int) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr[-3000:]
    assert lines and lines[-1].startswith("raymerge: error:") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[-1]


# -- inputs are never harmed -------------------------------------------------------------------

def test_overwrite_through_a_symlinked_alias_of_an_input_is_refused(llama_trio, tmp_path):
    cp = str(tmp_path / "cp")
    shutil.copytree(llama_trio["cp"], cp)
    before = _digest(cp)
    os.symlink(cp, tmp_path / "out_link")
    trio = {**llama_trio, "cp": cp}
    r = _run(_args(trio, str(tmp_path / "out_link"), "--overwrite"))
    assert "inputs are never modified" in _one_error_line(r, 2)
    assert _digest(cp) == before and sorted(os.listdir(tmp_path)) == ["cp", "out_link"]


def test_overwrite_replaces_the_old_checkpoint_only_at_commit(ray_local, llama_trio, tmp_path):
    out = str(tmp_path / "out")
    _merge(llama_trio, out, scale=1.0, shard_size="60KB")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"not raymerge's")
    old = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(out) if n != STAGING}

    proc = _start(_args(llama_trio, out, "--overwrite"), **SLOW)
    _kill_when_journaled(proc, out)
    # Killed mid-run: the old checkpoint is whole, untouched, still what its manifest says.
    assert {n: (tmp_path / "out" / n).read_bytes() for n in old} == old
    assert_bit_identical(load_folder(out), _reference(llama_trio, 1.0))

    _merge(llama_trio, out, resume=True)
    assert_bit_identical(load_folder(out), _reference(llama_trio))
    names = set(os.listdir(out))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # the user's files stay
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"not raymerge's"
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    shards = {s["name"] for s in manifest["shards"]}
    old_shards = {n for n in old if n.startswith("model-")}
    assert not (old_shards - shards) & names  # old shards the new checkpoint does not reuse are gone
    assert set(manifest["files"]) <= names and STAGING not in names


# -- inf and NaN are never committed silently -----------------------------------------------------

def _overflow_trio(root) -> dict[str, str]:
    """float32 checkpoints whose merge overflows float16 in one tensor; another holds a NaN in cp."""
    big = {"big.weight": torch.full((64, 64), 60000.0), "small.weight": torch.zeros(64, 64)}
    folders = {}
    for role, add in (("base", 0.0), ("chat", 20000.0), ("cp", 0.0)):
        tensors = {k: v + add for k, v in big.items()}
        if role == "cp":
            tensors["small.weight"][0, 0] = float("nan")
        folders[role] = os.path.join(root, role)
        os.makedirs(folders[role])
        save_file(tensors, os.path.join(folders[role], "model.safetensors"))
    return folders


def test_overflow_fails_the_run_until_allowed(ray_local, tmp_path):
    trio = _overflow_trio(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    args = ["merge", "--base", trio["base"], "--chat", trio["chat"], "--cp", trio["cp"], "--out", out,
            "--scale", "1.0", "--dtype", "float16", "--workers", "1"]
    r = _run(args)
    line = _one_error_line(r, 1)
    assert "finite inputs gave inf or NaN outputs in 1 tensors: big.weight (4096 elements)" in line
    assert "--resume --allow-nonfinite" in line and "small.weight" not in line
    assert not os.path.exists(os.path.join(out, "raymerge_manifest.json"))

    report = raymerge.merge(trio["base"], trio["chat"], trio["cp"], out, scale=1.0, dtype="float16", workers=1,
                            resume=True, allow_nonfinite=True).report()
    assert report["items_done_before"] == report["items"]  # nothing computed again
    assert report["nonfinite"] == {"big.weight": {"elements": 4096, "from_finite_inputs": 4096},
                                   "small.weight": {"elements": 1, "from_finite_inputs": 0}}
    import pyarrow.parquet as pq

    stats = {row["tensor"]: row for row in pq.read_table(os.path.join(out, "raymerge_stats.parquet")).to_pylist()}
    assert (stats["big.weight"]["nonfinite"], stats["big.weight"]["nonfinite_new"]) == (4096, 4096)
    assert (stats["small.weight"]["nonfinite"], stats["small.weight"]["nonfinite_new"]) == (1, 0)
    inputs = {role: load_folder(p) for role, p in trio.items()}
    want = weighted_reference(inputs["cp"], [(1.0, inputs["chat"], inputs["base"])], dtype=torch.float16)
    assert_bit_identical(load_folder(out), want)
    assert torch.isinf(want["big.weight"]).all()


# -- one run per output ---------------------------------------------------------------------------

def test_two_drivers_started_together_one_runs_one_is_refused(llama_trio, tmp_path):
    out = str(tmp_path / "out")
    procs = [_start(_args(llama_trio, out), **LASTING) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append((p.returncode, stderr))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip().splitlines()[-1]
    assert "another raymerge run is writing it (run " in refused and "last heartbeat" in refused
    assert_bit_identical(load_folder(out), _reference(llama_trio))


def test_a_second_driver_mid_run_is_refused_with_any_flag(llama_trio, tmp_path):
    out = str(tmp_path / "out")
    first = _start(_args(llama_trio, out), **LASTING)
    try:
        assert wait_for(lambda: _journaled(out) >= 2 or first.poll() is not None)
        assert first.poll() is None
        for flags in ([], ["--resume"], ["--overwrite"]):
            line = _one_error_line(_run(_args(llama_trio, out, *flags)), 2)
            assert "another raymerge run is writing it" in line, (flags, line)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert_bit_identical(load_folder(out), _reference(llama_trio))


def test_a_lease_gone_quiet_on_another_host_is_taken_over_only_when_asked(ray_local, llama_trio, tmp_path):
    out = tmp_path / "out"
    (out / STAGING).mkdir(parents=True)
    lease = out / STAGING / "lease.json"
    lease.write_text(json.dumps({"raymerge_lease": 1, "run_id": "r0", "host": "node-7", "pid": 99,
                                 "machine": "node-7|boot|ns", "started": 1.0, "heartbeat": 0.0}))
    os.utime(lease, (time.time() - 900, time.time() - 900))  # silent for 15 minutes
    line = _one_error_line(_run(_args(llama_trio, str(out))), 2)
    assert "run r0 on node-7, pid 99, last heartbeat 9" in line and "--resume" in line and "--overwrite" in line
    _merge(llama_trio, str(out), overwrite=True)
    assert_bit_identical(load_folder(str(out)), _reference(llama_trio))
    assert not (out / STAGING).exists()


# -- the journal: moved, damaged ------------------------------------------------------------------

def test_a_moved_output_resumes_where_it_now_is(ray_local, llama_trio, tmp_path):
    out, moved = str(tmp_path / "out"), str(tmp_path / "moved")
    _kill_when_journaled(_start(_args(llama_trio, out), **SLOW), out)
    os.rename(out, moved)
    result = _merge(llama_trio, moved, resume=True)
    assert 0 < result.items_done_before < result.items
    assert_bit_identical(load_folder(moved), _reference(llama_trio))
    assert not os.path.exists(out)  # nothing went back to where the folder was


def test_a_damaged_journal_is_refused_for_resume_and_overwrite_starts_over(ray_local, llama_trio, tmp_path):
    out = str(tmp_path / "out")
    _kill_when_journaled(_start(_args(llama_trio, out), **SLOW), out)
    head = os.path.join(out, STAGING, "journal-head.json")
    data = open(head, "rb").read()
    open(head, "wb").write(data[: len(data) // 2])  # truncated
    for flags in ([], ["--resume"]):
        line = _one_error_line(_run(_args(llama_trio, out, *flags)), 2)
        assert "resume journal is damaged" in line and "--overwrite to start over" in line
        assert "pass --resume" not in line
    _merge(llama_trio, out, overwrite=True)
    assert_bit_identical(load_folder(out), _reference(llama_trio))
    assert not os.path.exists(os.path.join(out, STAGING))


# -- workers that cannot start ----------------------------------------------------------------------

def _starting_workers() -> list[psutil.Process]:
    return own_processes("ray::MergeWorker.__init__")


def test_a_worker_killed_while_starting_is_replaced(ray_local, llama_trio, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RAYMERGE_TEST_START", "delay:3")
    out = str(tmp_path / "out")
    errors = []

    def go():
        try:
            raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=0.5,
                           item_size="16KiB", shard_size="100KB", workers=2)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    assert wait_for(lambda: len(_starting_workers()) >= 1 or not t.is_alive(), timeout=60)
    _starting_workers()[0].send_signal(signal.SIGKILL)
    t.join(timeout=300)
    assert not errors, errors
    assert "a worker died while starting" in caplog.text
    assert_bit_identical(load_folder(out), _reference(llama_trio))


def test_no_worker_can_start_is_one_line_with_the_workers_error(llama_trio, tmp_path):
    out = str(tmp_path / "out")
    r = _run(_args(llama_trio, out), RAYMERGE_TEST_START="exit")
    line = _one_error_line(r, 1)
    assert "execute: no worker could start (" in line and "attempts); the last one: " in line
    assert "--resume" not in line  # nothing to resume: nothing was staged
    assert not os.path.exists(out)


def test_special_token_rows_replace_what_overflowed_there(ray_local, tmp_path):
    """An embedding row that overflows F16 in the sum, then set to the chat model's (finite) row by
    --special-tokens, leaves no inf in the output: the run commits, and counts nothing."""
    from raymerge.errors import NonFiniteError

    folders = {}
    for role, bump in (("base", 0.0), ("chat", 20000.0), ("cp", 0.0)):
        embed = torch.zeros(16, 8)
        embed[3] = 60000.0 if role != "chat" else 60000.0 + bump
        folders[role] = str(tmp_path / role)
        os.makedirs(folders[role])
        save_file({"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(8)},
                  os.path.join(folders[role], "model.safetensors"))
    with pytest.raises(NonFiniteError, match=r"model.embed_tokens.weight \(8 elements\)"):
        raymerge.merge(folders["base"], folders["chat"], folders["cp"], str(tmp_path / "out1"), dtype="float16")
    result = raymerge.merge(folders["base"], folders["chat"], folders["cp"], str(tmp_path / "out2"),
                            dtype="float16", special_tokens="3:5")
    assert result.nonfinite == {}
    got = load_folder(str(tmp_path / "out2"))["model.embed_tokens.weight"]
    assert torch.isfinite(got).all() and torch.equal(got[3], torch.zeros(8, dtype=torch.float16))
