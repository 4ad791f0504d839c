"""Exact range reads (storage/ranges.py): against the Hub stand-in (bytes served == bytes asked,
concurrently), against a real S3 server (moto: reads pinned by If-Match / VersionId), and through
fsspec's generic path (a zip archive: plain file objects)."""

from __future__ import annotations

import logging
import secrets
import time
import zipfile

import boto3
import fsspec
import numpy as np
import pytest

from raymerge.errors import CHANGED, StorageError
from raymerge.planning.inputs import resolve
from raymerge.storage import urls
from raymerge.storage.hub import pin
from raymerge.storage.ranges import InputChanged, fetch, s3_version
from raymerge.storage.reader import Buffer, RangeReader
from raymerge.storage.retry import is_transient
from tests.hub_server import HubStandIn

TOKEN = "hf_test_" + secrets.token_hex(8)
DATA = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repo")
    (folder / "blob.bin").write_bytes(DATA)
    (folder / "small.json").write_bytes(b'{"a": 1}')
    server = HubStandIn(TOKEN).start()
    server.publish("org/r", str(folder))
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch):
    hub.point_driver_at_it(monkeypatch)
    hub.delay = 0.0
    yield hub
    hub.delay = 0.0


def _pinned(name: str) -> tuple[object, str]:
    fs, path = urls.filesystem(f"hf://org/r/{name}", None)
    return fs, pin(fs, path)[0]


RANGES = [(0, 8), (1_000_000, 1_000_001), (5, 100_000), (2_999_000, 3_000_000), (1_500_000, 2_600_000)]


def test_hub_ranges_are_exact_and_concurrent(hub_env):
    fs, path = _pinned("blob.bin")
    hub_env.reset_counts()
    hub_env.delay = 0.3
    started = time.perf_counter()
    got = fetch(fs, [(path, s, e) for s, e in RANGES])
    elapsed = time.perf_counter() - started
    assert got == [DATA[s:e] for s, e in RANGES]
    assert hub_env.total_served == sum(e - s for s, e in RANGES)  # no read-ahead: not a byte more
    reads = [r for r in hub_env.requests if "/resolve/" in r]
    assert len(reads) == len(RANGES)
    assert elapsed < 0.3 * len(RANGES) * 0.6, elapsed  # the reads overlapped


def test_reader_reads_hub_runs_exactly_and_reuses_open_files(hub_env):
    fs, path = _pinned("blob.bin")
    url = fs.unstrip_protocol(path)
    reader, buf = RangeReader(), Buffer()
    hub_env.reset_counts()
    wanted = [(10, 20), (2_000_000, 2_000_100)]  # far apart: two runs
    assert [bytes(v) for v in reader.read(url, wanted, buf)] == [DATA[s:e] for s, e in wanted]
    assert [bytes(v) for v in reader.read(url, [(7, 9)], buf)] == [DATA[7:9]]
    assert hub_env.total_served == 10 + 100 + 2
    # One listing (when the file was first opened), then only range reads: no metadata per range.
    api = [r for r in hub_env.requests if "/api/" in r and "/revision/" not in r]
    assert len(api) <= 1, hub_env.requests
    reader.close()


def test_hub_short_read_is_a_storage_error(hub_env):
    fs, path = _pinned("small.json")
    with pytest.raises(StorageError, match=r"returned 8 bytes for range \[0, 50\)"):
        fetch(fs, [(path, 0, 50)], sizes={path: 50})


def test_hub_pin_names_the_commit(hub_env):
    fs, path = urls.filesystem("hf://org/r/blob.bin", None)
    pinned, sha = pin(fs, path)
    assert sha == hub_env.branches["org/r"]["main"] and pinned == f"org/r@{sha}/blob.bin"
    assert pin(fs, f"org/r@{sha}")[0] == f"org/r@{sha}"


def test_generic_backend_reads_exactly_through_plain_file_objects(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("blob.bin", DATA[:200_000])
    fs = fsspec.filesystem("zip", fo=str(archive))
    files: dict = {}
    got = fetch(fs, [("blob.bin", 5, 9), ("blob.bin", 150_000, 199_999), ("blob.bin", 0, 1)], files=files)
    assert got == [DATA[5:9], DATA[150_000:199_999], DATA[0:1]]
    assert len(files) == 1  # opened once, reused for every range


# --- S3: reads pinned to the version the plan recorded ---

BUCKET = "ranges-test"


@pytest.fixture(scope="module")
def s3(s3_server):
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def _s3_fs(**options):
    return urls.filesystem(f"s3://{BUCKET}/x", options)[0]


def test_s3_reads_send_if_match_and_a_replaced_object_fails_clearly(s3, caplog):
    s3.put_object(Bucket=BUCKET, Key="obj", Body=DATA[:1_000_000])
    fs = _s3_fs()
    fs.invalidate_cache()
    version = s3_version(fs.info(f"{BUCKET}/obj"))
    url, reader, buf = f"s3://{BUCKET}/obj", RangeReader(), Buffer()
    assert [bytes(v) for v in reader.read(url, [(3, 30), (900_000, 900_010)], buf, version=version)] == \
        [DATA[3:30], DATA[900_000:900_010]]
    s3.put_object(Bucket=BUCKET, Key="obj", Body=DATA[1:1_000_001])  # same size, other bytes
    caplog.set_level(logging.WARNING, "raymerge")
    with pytest.raises(StorageError, match=r"s3://ranges-test/obj changed since the run was planned "
                                           r"\(ETag [0-9a-f]+ then\); rerun with --overwrite") as info:
        reader.read(url, [(3, 30)], buf, version=version)
    assert info.value.reason == CHANGED
    assert "retrying" not in caplog.text  # a changed input is not a transient failure
    assert not is_transient(InputChanged("x"))
    # Unpinned (a plan from before versions were recorded): reads whatever is there now.
    assert bytes(reader.read(url, [(3, 30)], buf)[0]) == DATA[4:31]


def test_s3_version_id_reads_the_planned_version_after_a_replacement(s3):
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=BUCKET, Key="v/obj", Body=DATA[:100_000])
    fs = _s3_fs(version_aware=True)
    fs.invalidate_cache()
    [entry] = fs.ls(f"{BUCKET}/v", detail=True)
    version = s3_version(entry)
    assert " versionId=" in version
    s3.put_object(Bucket=BUCKET, Key="v/obj", Body=DATA[5:100_005])
    reader = RangeReader({"version_aware": True})
    assert bytes(reader.read(f"s3://{BUCKET}/v/obj", [(0, 50)], Buffer(), version=version)[0]) == DATA[:50]


def test_s3_checkpoint_replaced_after_planning_fails_the_read(s3, tmp_path):
    """resolve records each shard's ETag; a worker reading with it after the shard was replaced
    gets a clear StorageError, never the new bytes."""
    from safetensors.numpy import save

    blob = save({"w": np.arange(64, dtype=np.float32)})
    s3.put_object(Bucket=BUCKET, Key="ck/model.safetensors", Body=blob)
    _s3_fs().invalidate_cache()
    ckpt = resolve("cp", f"s3://{BUCKET}/ck")
    [shard] = ckpt.files
    assert shard.version == s3.head_object(Bucket=BUCKET, Key="ck/model.safetensors")["ETag"].strip('"')
    assert f"version={shard.version};" in shard.fingerprint
    s3.put_object(Bucket=BUCKET, Key="ck/model.safetensors",
                  Body=save({"w": np.arange(1, 65, dtype=np.float32)}))
    ref = ckpt.tensors["w"]
    with pytest.raises(StorageError, match="ck/model.safetensors changed since the run was planned"):
        RangeReader().read(shard.url, [(ref.start, ref.start + ref.nbytes)], Buffer(), version=shard.version)


def test_local_and_memory_keep_their_exact_cat_ranges(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(DATA[:10_000])
    fs = fsspec.filesystem("file")
    assert fetch(fs, [(str(path), 1, 4), (str(path), 9_000, 10_000)]) == [DATA[1:4], DATA[9_000:10_000]]
    mem = fsspec.filesystem("memory")
    mem.pipe("/ranges/f.bin", DATA[:100])
    assert fetch(mem, [("/ranges/f.bin", 10, 20)]) == [DATA[10:20]]
