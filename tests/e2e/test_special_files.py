"""Nothing in a folder can make raymerge hang or write into an input.

Every command runs against folders holding special files where raymerge expects regular ones (a
FIFO, a socket, a link to a device) and against a staging folder whose staged file is a hard link
to an input: each must end within its timeout with exit 1 or 2, one line, no traceback, and every
input byte unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import subprocess
import sys

import pytest

import raymerge
from raymerge.config import build_recipe
from raymerge.execution.journal import Journal, JournalHead
from raymerge.planning.build import make_plan
from raymerge.storage.writers import STAGING, open_output

TIMEOUT = 60  # seconds: every refusal here comes before any worker starts


def _special(path: str, kind: str) -> None:
    if os.path.lexists(path):
        os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # the socket file stays: opening it fails, listing it says "other"
    else:
        os.symlink("/dev/zero", path)


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.isfile(path):  # special files have no bytes to compare
                h.update(name.encode() + open(path, "rb").read())
    return h.hexdigest()


def _raymerge(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raymerge", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def _assert_one_line(r: subprocess.CompletedProcess, codes: tuple[int, ...], expected: str) -> None:
    lines = r.stderr.strip().splitlines() + r.stdout.strip().splitlines()
    assert r.returncode in codes, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert any(expected in line for line in lines), r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) <= 1, r.stderr


def _copy_trio(trio: dict[str, str], root: str) -> dict[str, str]:
    """A copy of the session's trio this test may break."""
    import shutil

    return {role: shutil.copytree(path, os.path.join(root, role)) for role, path in trio.items()}


# (what is replaced in cp's folder, by what kind of special file)
INPUT_CASES = [("tokenizer_config.json", "fifo"), ("config.json", "socket"), ("shard", "device"),
               ("model.safetensors.index.json", "fifo")]


@pytest.mark.parametrize("name,kind", INPUT_CASES)
def test_special_files_in_an_input_are_refused_by_every_command(llama_trio, tmp_path, name, kind):
    trio = _copy_trio(llama_trio, str(tmp_path / "in"))
    target = sorted(glob.glob(os.path.join(trio["cp"], "model-*.safetensors")))[0] if name == "shard" else \
        os.path.join(trio["cp"], name)
    _special(target, kind)
    before = _digest(str(tmp_path / "in"))
    flags = ["--base", trio["base"], "--chat", trio["chat"], "--cp", trio["cp"]]
    what = {"fifo": "a FIFO", "socket": "a socket", "device": "a symbolic link to a character device"}[kind]
    _assert_one_line(_raymerge("merge", *flags, "--out", str(tmp_path / "out")), (2,), what)
    _assert_one_line(_raymerge("plan", *flags), (2,), what)
    recipe = tmp_path / "mergekit.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n"
                      f"  - model: {trio['cp']}\n    parameters: {{weight: 0.5}}\n")
    _assert_one_line(_raymerge("run", str(recipe), "--out", str(tmp_path / "out2")), (2,), what)
    assert _digest(str(tmp_path / "in")) == before
    assert not os.path.exists(tmp_path / "out" / "config.json")


@pytest.fixture(scope="module")
def finished(llama_trio, ray_local, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("finished") / "out")
    raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=0.5, shard_size="100KB")
    return out


@pytest.mark.parametrize("name", ["raymerge_manifest.json", "model.safetensors.index.json",
                                  "raymerge_stats.parquet"])
def test_verify_and_inspect_never_block_on_a_special_file_in_a_checkpoint(finished, tmp_path, name):
    import shutil

    out = shutil.copytree(finished, str(tmp_path / "out"))
    _special(os.path.join(out, name), "fifo")
    verify = _raymerge("verify", out)
    inspect = _raymerge("inspect", out)
    if name == "raymerge_stats.parquet":  # verify does not read the table
        assert verify.returncode == 0, verify.stdout + verify.stderr
    else:
        _assert_one_line(verify, (1,), "FIFO")
    if name == "model.safetensors.index.json":  # inspect does not read the index
        assert inspect.returncode == 0, inspect.stderr
        # the plot replaces the file of its name: never one of the checkpoint's own
        shard = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))[0]
        before = _digest(out)
        _assert_one_line(_raymerge("inspect", out, "--plot", os.path.join(out, shard)), (2,),
                         "is a file of the checkpoint it plots")
        assert _digest(out) == before
    else:
        _assert_one_line(inspect, (2,), "FIFO")


@pytest.mark.parametrize("name", ["lease.json", "journal-head.json"])
def test_a_special_file_in_the_staging_folder_never_blocks_a_run(llama_trio, tmp_path, name):
    out = tmp_path / "out"
    os.makedirs(out / STAGING)
    _special(str(out / STAGING / name), "fifo")
    flags = ["--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", llama_trio["cp"], "--out", str(out)]
    expected = "unreadable lease" if name == "lease.json" else "resume journal is damaged"
    _assert_one_line(_raymerge("merge", *flags), (2,), expected)
    _assert_one_line(_raymerge("merge", *flags, "--resume"), (2,), expected)


def test_resume_never_writes_into_an_input_through_a_hard_link(llama_trio, finished, tmp_path):
    """An unfinished run whose staged file is a hard link to an input of the same size (as `cp -al`
    or `rsync --link-dest` can leave it): --resume refuses, exit 2, and the input is unchanged;
    --overwrite unlinks the link and makes a new file, never writing through it."""
    out = str(tmp_path / "out")
    # cp is the earlier raymerge output: the planned shard has exactly its size and header
    values = dict(base=llama_trio["base"], chat=llama_trio["chat"], cp=finished, out=out, scale=[0.5],
                  shard_size="100KB")
    plan = make_plan(*build_recipe("merge", values))
    cp_shard = os.path.join(finished, plan.shards[0].name)
    assert len(plan.shards) > 1 and os.path.getsize(cp_shard) == plan.shards[0].size
    output = open_output(out, {})
    handles = output.prepare([(s.name, s.size) for s in plan.shards])
    Journal.begin(output, JournalHead.of(plan, handles, (), "forged", output.identities(handles)))
    staged = os.path.join(out, STAGING, handles[0])
    os.remove(staged)
    os.link(cp_shard, staged)
    before = _digest(finished)
    flags = ["--base", llama_trio["base"], "--chat", llama_trio["chat"], "--cp", finished, "--out", out,
             "--scale", "0.5", "--shard-size", "100KB"]
    _assert_one_line(_raymerge("merge", *flags, "--resume"), (2,), "is an input file")
    assert _digest(finished) == before
    raymerge.merge(llama_trio["base"], llama_trio["chat"], finished, out, scale=0.5, shard_size="100KB",
                   overwrite=True)
    assert _digest(finished) == before
    assert os.stat(os.path.join(out, plan.shards[0].name)).st_nlink == 1
