"""Faults on a real Ray: a killed driver, a killed worker; then --resume, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import psutil
import pytest

import raymerge
from raymerge.errors import OutputError
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder, own_processes, wait_for

STAGING = ".raymerge-staging"


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "raymerge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _journaled(out: str) -> int:
    folder = os.path.join(out, STAGING)
    if not os.path.isdir(folder):
        return 0
    return sum(len(json.load(open(os.path.join(folder, n)))) for n in os.listdir(folder)
               if n.startswith("journal-0"))


def _finished_names(out: str) -> list[str]:
    return [n for n in os.listdir(out) if n.endswith(".safetensors") or n.endswith(".json")]


def test_driver_sigkill_then_resume(llama_trio, tmp_path, ray_local, cli_main, capsys):
    """A driver killed mid-run with its own Ray (a subprocess); then, in this process on the
    session's Ray, the same command without --resume is refused and with it finishes the rest."""
    out = str(tmp_path / "out")
    args = ["merge", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--out", out, "--scale", "0.5", "--item-size", "4KiB", "--shard-size", "100KB", "--workers", "2"]
    env = {**os.environ, "RAYMERGE_TEST_ITEM_DELAY": "0.25"}
    env.pop("RAY_ADDRESS", None)
    proc = _cli(*args, env=env, start_new_session=True)
    try:
        assert wait_for(lambda: _journaled(out) >= 4), proc.stderr.read() if proc.poll() is not None else "slow"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, all at once
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = _journaled(out)
    # Killed mid-run: nothing looks like a checkpoint.
    assert _finished_names(out) == [], os.listdir(out)

    # Without --resume, the unfinished run is not silently thrown away.
    capsys.readouterr()
    assert cli_main(args) == 2 and "--resume" in capsys.readouterr().err

    assert cli_main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    total = json.load(open(os.path.join(out, "raymerge_manifest.json")))["items"]
    done_line = next(line for line in err.splitlines() if "resume:" in line)
    already = int(done_line.split("resume: ")[1].split(" of ")[0])
    assert 0 < done_before <= already + 2 and already < len(total)  # less work than a fresh run
    assert f"{len(total) - already} items to do" in err
    inputs = {role: load_folder(p) for role, p in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))
    assert not os.path.exists(os.path.join(out, STAGING))


def _partial_run(ray_local, llama_trio, out, monkeypatch, **kw):
    """Start a slow merge in a thread and stop it by killing every worker for good (no restarts)."""
    monkeypatch.setenv("RAYMERGE_TEST_ITEM_DELAY", "0.1")
    errors = []

    def go():
        try:
            raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, item_size="4KiB",
                           shard_size="100KB", workers=1, **kw)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t, errors


def _merge_workers() -> list[psutil.Process]:
    return own_processes("ray::MergeWorker")


def test_busy_worker_killed_mid_run_completes_bit_exact(ray_local, llama_trio, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    t, errors = _partial_run(ray_local, llama_trio, out, monkeypatch, scale=0.5)
    assert wait_for(lambda: _journaled(out) >= 2 and _merge_workers())
    victim = _merge_workers()[0]
    victim.send_signal(signal.SIGKILL)
    t.join(timeout=300)
    assert not errors, errors
    inputs = {role: load_folder(p) for role, p in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))


def test_resume_refused_when_inputs_or_recipe_changed(ray_local, llama_trio, tmp_path):
    """An unfinished run (its journal head written here by hand, as a run's staging step writes it;
    no items done) resumed with other inputs or scale."""
    cp = str(tmp_path / "cp")
    shutil.copytree(llama_trio["cp"], cp)
    out = str(tmp_path / "out")
    from raymerge.api import make_plan
    from raymerge.config import build_recipe
    from raymerge.execution.journal import Journal, JournalHead
    from raymerge.storage.writers import open_output

    recipe, run_options = build_recipe("merge", dict(base=llama_trio["base"], chat=llama_trio["chat"], cp=cp,
                                                     out=out, scale=0.5))
    plan = make_plan(recipe, run_options)
    output = open_output(out, {})
    Journal.begin(output, JournalHead.of(plan, output.prepare([(s.name, s.size) for s in plan.shards])))

    with pytest.raises(OutputError, match="recipe, inputs or options differ"):
        raymerge.merge(llama_trio["base"], llama_trio["chat"], cp, out, scale=1.0, resume=True)
    shard = sorted(n for n in os.listdir(cp) if n.endswith(".safetensors"))[0]
    os.utime(os.path.join(cp, shard), (1, 1))  # the input changed: new mtime
    with pytest.raises(OutputError, match=f"input {cp}/{shard} changed"):
        raymerge.merge(llama_trio["base"], llama_trio["chat"], cp, out, scale=0.5, resume=True)
    assert _finished_names(out) == []


def test_node_lost_mid_run_completes_bit_exact(llama_trio, tmp_path):
    out = str(tmp_path / "out")
    script = os.path.join(os.path.dirname(__file__), "scripts", "node_loss.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, script, llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out],
                       capture_output=True, text=True, env=env, timeout=400,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["errors"] == [], result
    assert "a worker died" in r.stderr  # the node's worker was lost, and the run went on without it
    inputs = {role: load_folder(p) for role, p in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))
