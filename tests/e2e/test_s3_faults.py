"""S3 faults: the server stops mid-run (the run fails, naming the URL, and keeps its journal and
open uploads), comes back, and --resume finishes the checkpoint bit for bit. Credentials given
as storage options never reach the manifest, the journal or the messages."""

from __future__ import annotations

import os
import threading
import time

import boto3
import pytest
from moto.server import ThreadedMotoServer

import raymerge
from raymerge.errors import CommitError, StorageError
from tests.conftest import _free_port, make_llama_trio
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder

SECRET = "sEcReT-never-logged-9f3a"


@pytest.fixture
def own_server(s3_server):
    """A second moto server on its own port, sharing moto's in-process state, that a test may stop."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    box = {"server": server, "port": port, "endpoint": f"http://127.0.0.1:{port}"}
    yield box
    box["server"].stop()


def test_s3_server_lost_mid_run_then_resume(ray_local, own_server, tmp_path, monkeypatch, caplog):
    local = make_llama_trio(str(tmp_path / "trio"), hidden=512, layers=4, vocab=2048, intermediate=1024,
                            max_shard_size="8MB", seed=5)
    s3 = boto3.client("s3", endpoint_url=own_server["endpoint"])
    s3.create_bucket(Bucket="faults")
    for role, folder in local.items():
        for name in os.listdir(folder):
            s3.upload_file(os.path.join(folder, name), "faults", f"{role}/{name}")
    # botocore's own retries of a refused connection (5, backing off) only make the test wait
    options = {"client_kwargs": {"endpoint_url": own_server["endpoint"]}, "key": "testing", "secret": SECRET,
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    args = ("s3://faults/base", "s3://faults/chat", "s3://faults/cp", "s3://faults/out")
    kw = dict(scale=0.5, item_size="5MiB", shard_size="12MB", workers=2, in_flight=1, storage_options=options)
    # Slow enough that the first journal batch (flushed after 2 s) comes while items are still to do:
    # the server is lost mid-execute, never during the commit.
    monkeypatch.setenv("RAYMERGE_TEST_ITEM_DELAY", "2.0")
    monkeypatch.setenv("RAYMERGE_IO_RETRIES", "1")
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, lambda: raymerge.merge(*args, **kw)))
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _journal_batches(s3) and t.is_alive():
        time.sleep(0.1)
    own_server["server"].stop()
    t.join(timeout=300)
    assert errors and isinstance(errors[0], (StorageError, CommitError)), errors
    message = str(errors[0])
    assert "s3://faults/" in message and "--resume" in message and SECRET not in message

    own_server["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=own_server["port"], verbose=False)
    own_server["server"].start()
    assert s3.list_multipart_uploads(Bucket="faults").get("Uploads")  # kept for --resume, as the error said
    monkeypatch.setenv("RAYMERGE_TEST_ITEM_DELAY", "0")
    result = raymerge.merge(*args, **kw, resume=True)
    assert not s3.list_multipart_uploads(Bucket="faults").get("Uploads")
    out = tmp_path / "out"
    out.mkdir()
    for obj in s3.list_objects_v2(Bucket="faults", Prefix="out/")["Contents"]:
        assert ".raymerge-staging" not in obj["Key"]
        s3.download_file("faults", obj["Key"], str(out / obj["Key"].split("/", 1)[1]))
    inputs = {role: load_folder(p) for role, p in local.items()}
    assert_bit_identical(load_folder(str(out)), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))
    assert len(result.shards) > 1
    assert SECRET not in (out / "raymerge_manifest.json").read_text()
    assert SECRET not in caplog.text


def _capture(errors, fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported to the test thread
        errors.append(e)


def _journal_batches(s3) -> int:
    listing = s3.list_objects_v2(Bucket="faults", Prefix="out/.raymerge-staging/journal-0")
    return listing.get("KeyCount", 0)


def test_input_replaced_mid_run_is_never_mixed_and_the_hint_is_overwrite(ray_local, s3_server, tmp_path, monkeypatch):
    """Reads are pinned to the ETags resolved at plan time (If-Match): a cp shard replaced while the
    run goes fails it with the URL and "start over with --overwrite" (never --resume, which
    could not work); --overwrite then merges the new cp, bit for bit."""
    from raymerge.errors import StorageError

    local = make_llama_trio(str(tmp_path / "trio"), hidden=256, layers=2, vocab=1024, intermediate=512,
                            max_shard_size="1MB", seed=7)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="pinned")
    for role, folder in local.items():
        for name in os.listdir(folder):
            s3.upload_file(os.path.join(folder, name), "pinned", f"{role}/{name}")
    args = ("s3://pinned/base", "s3://pinned/chat", "s3://pinned/cp", "s3://pinned/out")
    kw = dict(scale=0.5, item_size="5MiB", shard_size="100MB", workers=1)
    monkeypatch.setenv("RAYMERGE_TEST_ITEM_DELAY", "1.0")
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, lambda: raymerge.merge(*args, **kw)))
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and t.is_alive() and not s3.list_multipart_uploads(Bucket="pinned").get("Uploads"):
        time.sleep(0.1)
    shards = sorted(n for n in os.listdir(local["cp"]) if n.endswith(".safetensors"))
    newer = make_llama_trio(str(tmp_path / "newer"), hidden=256, layers=2, vocab=1024, intermediate=512,
                            max_shard_size="1MB", seed=8, roles=("cp",))["cp"]
    for name in shards:  # a new version of cp, published while the run reads the old one
        s3.upload_file(os.path.join(newer, name), "pinned", f"cp/{name}")
    t.join(timeout=300)
    assert errors and isinstance(errors[0], StorageError), errors
    message = str(errors[0])
    assert "s3://pinned/cp/" in message and "changed since the run was planned" in message
    assert "--overwrite" in message and "--resume" not in message

    monkeypatch.setenv("RAYMERGE_TEST_ITEM_DELAY", "0")
    raymerge.merge(*args, **kw, overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    for obj in s3.list_objects_v2(Bucket="pinned", Prefix="out/")["Contents"]:
        s3.download_file("pinned", obj["Key"], str(out / obj["Key"].split("/", 1)[1]))
    inputs = {role: load_folder(p) for role, p in local.items()}
    inputs["cp"] = load_folder(newer)
    assert_bit_identical(load_folder(str(out)), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))
