"""The command line as a user runs it: a subprocess, exit statuses, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

import raymerge


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raymerge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_version_and_help_with_example():
    assert run("--version").stdout.strip() == f"raymerge {raymerge.__version__}"
    for cmd in ("merge", "plan", "demo"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "example:" in r.stdout


def test_plan_json_moves_no_data_and_writes_nothing(llama_trio, tmp_path):
    before = {p: os.path.getmtime(os.path.join(llama_trio["cp"], p)) for p in os.listdir(llama_trio["cp"])}
    r = run("plan", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--shard-size", "100KB", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["output_bytes"] == sum(s["size"] for s in info["shards"])
    assert len(info["shards"]) > 1 and len(info["items"]) >= len(info["shards"])
    from tests.helpers import load_folder

    cp = load_folder(llama_trio["cp"])
    assert {t["name"] for t in info["tensors"]} == set(cp)
    assert sum(t["nbytes"] for t in info["tensors"]) == sum(v.numel() * v.element_size() for v in cp.values())
    assert os.listdir(tmp_path) == []
    assert before == {p: os.path.getmtime(os.path.join(llama_trio["cp"], p)) for p in os.listdir(llama_trio["cp"])}
    r = run("plan", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"])
    assert r.returncode == 0 and "shards" in r.stdout


@pytest.mark.parametrize("extra,match", [
    (["--scale", "abc"], "--scale 'abc': not a number"),
    (["--scale", "nan"], "finite"),
    (["--shard-size", "5XB"], "--shard-size '5XB': not a size"),
    (["--dtype", "int8"], "not a float dtype"),
    (["--storage-options", "{oops"], "--storage-options: not valid JSON"),
    (["--workers", "0"], "--workers 0: must be an integer >= 1"),
])
def test_bad_options_exit_2_with_one_line(llama_trio, tmp_path, extra, match):
    out = str(tmp_path / "out")
    r = run("merge", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--out", out, *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:") and match in lines[0], r.stderr
    assert not os.path.exists(out)


def test_missing_input_and_output_inside_input_exit_2(llama_trio, tmp_path):
    r = run("merge", "--base", str(tmp_path / "nope"), "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "--base" in r.stderr and "no such checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("merge", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--out", llama_trio["cp"])
    assert r.returncode == 2 and "inputs are never modified" in r.stderr
    r = run("merge", "--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"],
            "--out", "gs://bucket/x")
    assert r.returncode == 2 and "not supported" in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run("plan", "--base", str(tmp_path / "a"), "--chat", str(tmp_path / "b"), "--cp", str(tmp_path / "c"),
            "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_merge_command_end_to_end_on_embedded_ray(llama_trio, tmp_path):
    """The CLI starts its own local Ray (no RAY_ADDRESS), merges, and exits 0."""
    from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder

    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "raymerge", "merge", "--base", llama_trio["base"], "--chat",
                        llama_trio["chat"], "--cp", llama_trio["cp"], "--out", out, "--scale", "0.5",
                        "--workers", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "execute:" in r.stderr
    inputs = {role: load_folder(p) for role, p in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))


def test_report_and_plot_paths_that_are_special_files_are_refused_before_any_work(tmp_path):
    """--report or --plot naming a FIFO or a device: exit 2, one line, before a run or a read starts
    (a FIFO opened for writing waits for a reader forever)."""
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    for args in (["merge", "--base", "b", "--chat", "c", "--cp", "p", "--out", str(tmp_path / "o"), "--report", str(fifo)],
                 ["run", str(tmp_path / "missing.yml"), "--report", "/dev/null"],
                 ["inspect", str(tmp_path), "--plot", str(fifo)],
                 ["merge", "--base", "b", "--chat", "c", "--cp", "p", "--out", "o", "--report", "/no/such/dir/r.json"]):
        r = run(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "not a regular file" in r.stderr or "folder does not exist" in r.stderr, r.stderr
    cp = tmp_path / "cp"
    cp.mkdir()
    (cp / "model.safetensors").write_bytes(b"the input's bytes")
    r = run("merge", "--base", "b", "--chat", "c", "--cp", str(cp), "--out", str(tmp_path / "o"),
            "--report", str(cp / "model.safetensors"))
    assert r.returncode == 2 and "--report" in r.stderr and "inputs are never modified" in r.stderr, r.stderr
    assert (cp / "model.safetensors").read_bytes() == b"the input's bytes"


def test_a_report_written_after_the_run_is_a_regular_file_only(tmp_path):
    from raymerge.cli import _write_report
    from raymerge.errors import RaymergeError

    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    with pytest.raises(RaymergeError, match="is a FIFO, not a regular file"):
        _write_report(str(fifo), b"{}")
    (tmp_path / "ok.json").write_bytes(b"an older, longer report")
    os.link(tmp_path / "ok.json", tmp_path / "kept.json")  # a hard link: replaced by name, never written through
    _write_report(str(tmp_path / "ok.json"), b"{}")
    assert (tmp_path / "ok.json").read_bytes() == b"{}"
    assert (tmp_path / "kept.json").read_bytes() == b"an older, longer report"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
