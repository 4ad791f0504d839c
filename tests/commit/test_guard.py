"""Output safety without Ray: an output that is, holds or lies in an input is refused however it is
spelled; --overwrite may remove only what a manifest or an index names; staging never writes
through a planted symbolic link."""

from __future__ import annotations

import json
import os

import pytest

from raymerge.commit.guard import check_not_input, old_checkpoint
from raymerge.errors import OutputError
from raymerge.storage.writers import STAGING, open_output


@pytest.fixture
def tree(tmp_path):
    cp = tmp_path / "models" / "cp"
    cp.mkdir(parents=True)
    (cp / "model.safetensors").write_bytes(b"cp weights")
    return tmp_path, cp


@pytest.mark.parametrize("spell", [
    lambda t, cp: str(cp),  # the input itself
    lambda t, cp: str(cp) + "/",  # a trailing slash
    lambda t, cp: f"file://{cp}",  # a file URL
    lambda t, cp: str(t / "models" / ".." / "models" / "cp"),  # dots
    lambda t, cp: _link(t / "alias", cp),  # a symbolic link to it
    lambda t, cp: str(cp / "merged"),  # inside it
    lambda t, cp: _link(t / "alias2", cp) + "/merged",  # inside it, through a link
    lambda t, cp: str(t / "models"),  # holding it
    lambda t, cp: _link(t / "alias3", t / "models"),  # holding it, through a link
])
def test_output_overlapping_an_input_is_refused_however_spelled(tree, spell):
    t, cp = tree
    with pytest.raises(OutputError, match="inputs are never modified"):
        check_not_input(spell(t, cp), [str(cp)])


def test_bind_mount_of_an_input_is_refused(tree):
    t, cp = tree
    mnt = t / "mnt"
    mnt.mkdir()
    if os.system(f"mount --bind {cp} {mnt} 2>/dev/null") != 0:
        pytest.skip("bind mounts need root")
    try:
        with pytest.raises(OutputError, match="inputs are never modified"):
            check_not_input(str(mnt), [str(cp)])
    finally:
        os.system(f"umount {mnt}")


def test_siblings_and_s3_spellings(tree):
    t, cp = tree
    check_not_input(str(t / "models" / "cp-merged"), [str(cp)])  # a sibling with a common prefix is fine
    for out in ("s3a://bucket/models/cp", "s3n://bucket/models/cp/x", "s3://bucket/models"):
        with pytest.raises(OutputError):
            check_not_input(out, ["s3://bucket/models/cp"])
    check_not_input("s3://bucket/models/cp2", ["s3://bucket/models/cp"])
    check_not_input("s3://other/models/cp", ["s3://bucket/models/cp"])


def test_every_fsspec_alias_of_a_store_is_one_scheme(tree):
    """gs:// and gcs:// name one Google Cloud Storage bucket, az:// and abfs:// one Azure container,
    local:// the local disk: an output over an input spelled with the other alias is refused."""
    t, cp = tree
    for out, inp in (("gcs://bucket/models", "gs://bucket/models/cp"), ("gs://bucket/m/cp/out", "gcs://bucket/m/cp"),
                     ("abfs://box/models/cp", "az://box/models/cp"), (f"local://{cp}/merged", str(cp))):
        with pytest.raises(OutputError, match="inputs are never modified"):
            check_not_input(out, [inp])
    with pytest.raises(OutputError, match="inputs are never modified"):
        check_not_input("gcs://b/x", ["gs://b/x/y"])  # holding an input spelled with the other alias
    check_not_input("gcs://bucket/models/cp2", ["gs://bucket/models/cp"])
    check_not_input("gcs://bucket/models/cp", ["s3://bucket/models/cp"])  # another store


def _link(path, target) -> str:
    os.symlink(target, path)
    return str(path)


def test_overwrite_removes_only_named_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
             "raymerge_stats.parquet", "notes.txt", "adapter_model.safetensors", "model.safetensors.index.json",
             "raymerge_manifest.json", "tokenizer.json"]
    for n in names:
        (out / n).write_text("x")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors", "c": "sub/x.safetensors"}}))
    manifest = {"format": "raymerge-manifest", "format_version": 1, "plan_hash": "h", "stats": "raymerge_stats.parquet",
                "recipe": {"kind": "merge"}, "layout": {}, "inputs": [], "items": [],
                "shards": [{"name": "model-00001-of-00002.safetensors", "size": 1}], "files": ["config.json"]}
    (out / "raymerge_manifest.json").write_text(json.dumps(manifest))
    old = old_checkpoint(open_output(str(out), {}))
    assert set(old.removable) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                  "config.json", "raymerge_stats.parquet", "model.safetensors.index.json",
                                  "raymerge_manifest.json"}
    assert set(old.strays) == {"adapter_model.safetensors", "tokenizer.json"}  # look like a checkpoint's: kept
    assert "notes.txt" not in old.present + old.removable


def test_a_damaged_old_index_removes_nothing_it_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("x")
    (out / "model.safetensors.index.json").write_text("[" * 10000)
    old = old_checkpoint(open_output(str(out), {}))
    assert old.removable == ("model.safetensors.index.json",)


def test_staging_never_writes_through_planted_links(tree, tmp_path):
    t, cp = tree
    out = open_output(str(tmp_path / "out"), {})
    staging = tmp_path / "out" / STAGING
    staging.mkdir(parents=True)
    os.symlink(cp / "model.safetensors", staging / "model.safetensors.partial")
    handles = out.prepare([("model.safetensors", 4096)])
    assert (cp / "model.safetensors").read_bytes() == b"cp weights"  # not truncated through the link
    assert not os.path.islink(staging / handles[0]) and os.path.getsize(staging / handles[0]) == 4096
    os.symlink(cp / "model.safetensors", tmp_path / "out" / "config.json")
    out.files.put("config.json", b"{}")  # replaces the link itself
    assert (cp / "model.safetensors").read_bytes() == b"cp weights"
    out.files.delete(["config.json"])
    assert (cp / "model.safetensors").exists()


def test_staging_folder_that_is_a_link_is_refused(tree, tmp_path):
    t, cp = tree
    (tmp_path / "out").mkdir()
    os.symlink(cp, tmp_path / "out" / STAGING)
    with pytest.raises(OutputError, match="is a symbolic link"):
        open_output(str(tmp_path / "out"), {}).prepare([("model.safetensors", 10)])
    assert sorted(os.listdir(cp)) == ["model.safetensors"]


def test_journal_handles_must_be_the_shards_staged_names(tmp_path):
    out = open_output(str(tmp_path / "out"), {})
    out.check_handles(["model.safetensors"], ["model.safetensors.partial"])
    for bad in (["/elsewhere/model.safetensors.partial"], ["../model.safetensors.partial"], ["other.partial"]):
        with pytest.raises(OutputError, match="resume journal"):
            out.check_handles(["model.safetensors"], bad)
