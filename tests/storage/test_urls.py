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
