"""raymerge verify on a good output, a flipped byte, a missing shard, and recomputation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest

import raymerge


@pytest.fixture(scope="module")
def merged(ray_local, llama_trio, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("verify") / "out")
    raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=0.5, shard_size="100KB",
                   item_size="16KiB")
    return out


def verify(*args):
    return subprocess.run([sys.executable, "-m", "raymerge", "verify", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def copy(merged, tmp_path):
    dest = str(tmp_path / "copy")
    shutil.copytree(merged, dest)
    return dest


def test_good_output_verifies_and_recomputes(merged):
    r = verify(merged, "--recompute", "3")
    assert r.returncode == 0 and "OK" in r.stdout and "3 items recomputed" in r.stdout, r.stdout + r.stderr


def test_flipped_byte_names_shard_and_tensor(copy):
    manifest = json.load(open(os.path.join(copy, "raymerge_manifest.json")))
    item = next(i for i in manifest["items"] if i["shard"] == 1 and i["end"] - i["start"] > 1000)
    shard = manifest["shards"][1]["name"]
    path = os.path.join(copy, shard)
    data = bytearray(open(path, "rb").read())
    data[item["end"] - 10] ^= 0x01
    open(path, "wb").write(data)
    r = verify(copy)
    assert r.returncode == 1
    assert shard in r.stdout and "tensors model." in r.stdout and "checksum" in r.stdout, r.stdout


def test_missing_shard_fails(copy):
    manifest = json.load(open(os.path.join(copy, "raymerge_manifest.json")))
    shard = manifest["shards"][0]["name"]
    os.remove(os.path.join(copy, shard))
    r = verify(copy)
    assert r.returncode == 1 and f"{shard}: missing" in r.stdout


def test_recompute_catches_bytes_whose_checksum_was_forged(copy):
    """Changed bytes with a matching checksum pass the CRC check; recomputing from inputs catches them."""
    path = os.path.join(copy, "raymerge_manifest.json")
    manifest = json.load(open(path))
    shard = manifest["shards"][0]["name"]
    data = bytearray(open(os.path.join(copy, shard), "rb").read())
    for item in manifest["items"]:
        if item["shard"] == 0:
            data[item["end"] - 2] ^= 0x40
            item["crc32"] = f"{zlib.crc32(bytes(data[item['start']:item['end']])):08x}"
    open(os.path.join(copy, shard), "wb").write(data)
    json.dump(manifest, open(path, "w"))
    assert verify(copy).returncode == 0
    r = verify(copy, "--recompute", str(len(manifest["items"])))
    assert r.returncode == 1 and "computed again from the inputs" in r.stdout and shard in r.stdout


def test_not_a_raymerge_checkpoint(tmp_path):
    r = verify(str(tmp_path))
    assert r.returncode == 1 and "raymerge_manifest.json: missing" in r.stdout
