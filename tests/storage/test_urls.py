"""What workers get from the driver's environment, per backend; the Hub endpoint; unpinned URLs."""

from __future__ import annotations

import pytest

from raymerge.storage import urls

BACKEND_VARS = ("AWS_", "HF_", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_", "STORAGE_EMULATOR_HOST", "GCSFS_", "AZURE_",
                "RAYMERGE_")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No backend settings at all, and no Hugging Face token file."""
    import os

    import huggingface_hub.constants

    for key in list(os.environ):
        if key.startswith(BACKEND_VARS):
            monkeypatch.delenv(key)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return monkeypatch


def test_worker_env_forwards_each_backends_settings_only_when_used(clean_env):
    for key, value in {"AWS_ACCESS_KEY_ID": "a", "AWS_ENDPOINT_URL": "http://s3", "HF_TOKEN": "hf_x",
                       "HF_ENDPOINT": "http://hub", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
                       "STORAGE_EMULATOR_HOST": "http://gcs", "AZURE_STORAGE_ACCOUNT_KEY": "k",
                       "RAYMERGE_IO_RETRIES": "2", "HOME_UNRELATED": "no"}.items():
        clean_env.setenv(key, value)
    assert urls.worker_env(["hf://org/a", "hf://org/b"], "/local/out") == {
        "HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://hub", "RAYMERGE_IO_RETRIES": "2"}
    assert urls.worker_env(["/a", "/b"], "s3://bucket/out") == {
        "AWS_ACCESS_KEY_ID": "a", "AWS_ENDPOINT_URL": "http://s3", "RAYMERGE_IO_RETRIES": "2"}
    assert urls.worker_env(["gs://b/a"], None) == {
        "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "STORAGE_EMULATOR_HOST": "http://gcs", "RAYMERGE_IO_RETRIES": "2"}
    assert urls.worker_env(["abfs://c/a"], None) == {"AZURE_STORAGE_ACCOUNT_KEY": "k", "RAYMERGE_IO_RETRIES": "2"}
    assert urls.worker_env(["s3a://b/a"], None)["AWS_ACCESS_KEY_ID"] == "a"  # one spelling of S3


def test_worker_env_sends_the_token_of_the_drivers_token_file(clean_env, tmp_path):
    import huggingface_hub.constants

    (tmp_path / "token").write_text("hf_from_file\n")
    clean_env.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert urls.worker_env(["hf://org/a"], None) == {"HF_TOKEN": "hf_from_file"}
    assert urls.worker_env(["/local"], None) == {}  # not for runs that do not read the Hub


def test_hub_filesystem_gets_the_endpoint_explicitly(clean_env):
    clean_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    fs, path = urls.filesystem("hf://org/name/file.json", None)
    assert fs.endpoint == "http://127.0.0.1:9" and path == "org/name/file.json"
    fs, _ = urls.filesystem("hf://org/name", {"endpoint": "http://mirror"})  # an explicit option wins
    assert fs.endpoint == "http://mirror"


@pytest.mark.parametrize("url, want", [
    ("hf://org/name@0123456789abcdef0123456789abcdef01234567/model.safetensors", "hf://org/name/model.safetensors"),
    ("hf://datasets/org/name@main/a/b.json", "hf://datasets/org/name/a/b.json"),
    ("hf://org/name@refs/pr/3/model.safetensors", "hf://org/name/model.safetensors"),
    ("hf://org/name@abc", "hf://org/name"),
    ("hf://org/name/model.safetensors", "hf://org/name/model.safetensors"),
    ("s3://user@bucket/key", "s3://user@bucket/key"),
    ("/local/a@b/c", "/local/a@b/c"),
])
def test_unpinned(url, want):
    assert urls.unpinned(url) == want


def test_every_alias_fsspec_knows_for_one_class_is_one_scheme():
    from fsspec.registry import known_implementations

    by_class: dict[str, list[str]] = {}
    for protocol, spec in known_implementations.items():
        by_class.setdefault(spec["class"], []).append(protocol)
    families = [p for p in by_class.values() if len(p) > 1]
    assert ["gcs", "gs"] in families and ["s3", "s3a"] in families and ["abfs", "az"] in families
    for family in families:
        assert len({urls.one_scheme(f"{p}://bucket/key") for p in family}) == 1, family
    assert urls.one_scheme("gs://b/x") == urls.one_scheme("gcs://b/x") == "gcs://b/x"
    assert urls.one_scheme("az://c/x") == urls.one_scheme("abfs://c/x")
    assert urls.one_scheme("s3a://b/x") == urls.one_scheme("s3n://b/x") == urls.one_scheme("s3://b/x") == "s3://b/x"
    assert urls.one_scheme("local:///tmp/x") == "file:///tmp/x"
    assert urls.one_scheme("gcs://b/x") != urls.one_scheme("s3://b/x")  # another store


def test_a_protocol_registered_at_run_time_joins_its_class_family(monkeypatch):
    import importlib

    from s3fs import S3FileSystem

    # As a plugin registering its class under a new name (fsspec.register_implementation) would.
    live = importlib.import_module("fsspec.registry")._registry  # the package's `registry` is its read-only view
    monkeypatch.setitem(live, "zz-s3", S3FileSystem)
    assert urls.one_scheme("zz-s3://b/x") == urls.one_scheme("s3a://b/x") == urls.one_scheme("s3://b/x")
    monkeypatch.setitem(live, "zz-other", type("Other", (), {}))
    assert urls.one_scheme("zz-other://b/x") == "zz-other://b/x"
