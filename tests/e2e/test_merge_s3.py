"""End to end through a real S3 server (moto over HTTP on 127.0.0.1): inputs in several shards
read by range, output written as multipart uploads of several parts per shard."""

from __future__ import annotations

import os

import boto3
import pytest

import raymerge
from raymerge.commit.manifest import MANIFEST_NAME
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder

BUCKET = "models"


@pytest.fixture(scope="module")
def s3_trio(s3_server, tmp_path_factory):
    """A ~14 MB-per-checkpoint trio, in 3 shards each, uploaded to s3://models/<role>."""
    local = make_llama_trio(str(tmp_path_factory.mktemp("s3trio")), hidden=512, layers=2, vocab=2048,
                            intermediate=1024, max_shard_size="6MB", seed=1)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for role, folder in local.items():
        for name in os.listdir(folder):
            s3.upload_file(os.path.join(folder, name), BUCKET, f"{role}/{name}")
    return local


def _download(prefix: str, dest: str) -> list[str]:
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])]
    os.makedirs(dest, exist_ok=True)
    for key in keys:
        s3.download_file(BUCKET, key, os.path.join(dest, key.rsplit("/", 1)[1]))
    return sorted(k.rsplit("/", 1)[1] for k in keys)


def test_merge_s3_to_s3_multipart(ray_local, s3_trio, tmp_path):
    inputs = {role: f"s3://{BUCKET}/{role}" for role in ("base", "chat", "cp")}
    result = raymerge.merge(inputs["base"], inputs["chat"], inputs["cp"], f"s3://{BUCKET}/merged", scale=0.5,
                            shard_size="12MB", item_size="5MiB", workers=2)
    assert len(result.shards) == 2
    names = _download("merged", str(tmp_path / "out"))
    assert set(result.shards) <= set(names) and MANIFEST_NAME in names
    assert "model.safetensors.index.json" in names and "config.json" in names

    local = {role: load_folder(path) for role, path in s3_trio.items()}
    want = chat_vector_reference(local["base"], local["chat"], local["cp"], 0.5)
    assert_bit_identical(load_folder(str(tmp_path / "out")), want)

    s3 = boto3.client("s3")
    # Each shard went up as one part per planned item, and the first needed several.
    plan = raymerge.plan(inputs["base"], inputs["chat"], inputs["cp"], scale=0.5, out=f"s3://{BUCKET}/merged",
                         shard_size="12MB", item_size="5MiB")
    parts = [s3.head_object(Bucket=BUCKET, Key=f"merged/{s.name}", PartNumber=1)["PartsCount"]
             for s in plan.shards]
    assert parts == [len(s.items) for s in plan.shards] and parts[0] >= 3
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads"), "an upload was left open"


def test_missing_output_bucket_fails_with_its_name(ray_local, s3_trio):
    from raymerge.errors import OutputError

    # Refused before any work: the lease, the run's first write, cannot be written there.
    with pytest.raises(OutputError, match="s3://no-such-bucket/out: cannot write there"):
        raymerge.merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/chat", f"s3://{BUCKET}/cp",
                       "s3://no-such-bucket/out", item_size="5MiB")
    assert not boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_s3_output_abort_leaves_no_upload_and_no_object(s3_server):
    """The writer protocol on its own: parts uploaded by any process, then abort (a failed run)."""
    from raymerge.storage.s3_output import S3Output
    from raymerge.storage.writers import Span, Target

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="abort-test")
    out = S3Output("s3://abort-test/x", {})
    handles = out.prepare([("model.safetensors", 6 << 20)])
    etag = out.write(Target("model.safetensors", handles[0], 6 << 20), Span(1, 0, 5 << 20),
                     memoryview(b"\0" * (5 << 20)))
    assert etag and s3.list_multipart_uploads(Bucket="abort-test").get("Uploads")
    out.abort(["model.safetensors"], handles)
    assert not s3.list_multipart_uploads(Bucket="abort-test").get("Uploads")
    assert "Contents" not in s3.list_objects_v2(Bucket="abort-test")


def test_extract_and_apply_on_s3(ray_local, s3_trio, tmp_path):
    """The vector workflow through S3: extract s3 -> s3, then apply it s3 -> s3 with a skip rule."""
    from tests.helpers import weighted_reference

    raymerge.extract(f"s3://{BUCKET}/base", f"s3://{BUCKET}/chat", f"s3://{BUCKET}/vec", item_size="5MiB")
    raymerge.apply(f"s3://{BUCKET}/cp", f"s3://{BUCKET}/vec", f"s3://{BUCKET}/applied", scale=0.5,
                   skip=[r"norm\.weight$"], item_size="5MiB", shard_size="20MB")
    local = {role: load_folder(path) for role, path in s3_trio.items()}
    _download("vec", str(tmp_path / "vec"))
    vec = load_folder(str(tmp_path / "vec"))
    assert_bit_identical(vec, weighted_reference(None, [(1.0, local["chat"], local["base"])]))
    names = _download("applied", str(tmp_path / "applied"))
    assert "raymerge_stats.parquet" in names and "tokenizer_config.json" in names
    want = weighted_reference(local["cp"], [(0.5, vec, None)], skip=lambda n: n.endswith("norm.weight"))
    assert_bit_identical(load_folder(str(tmp_path / "applied")), want)
    assert_bit_identical(load_folder(str(tmp_path / "applied")), chat_vector_reference(
        {k: v for k, v in local["base"].items()}, local["chat"], local["cp"], 0.5) | {
        k: local["cp"][k] for k in local["cp"] if k.endswith("norm.weight")})
    assert not boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_verify_staged_tells_an_empty_upload_from_a_gone_one(s3_server):
    """Resume must keep an open upload that has no parts yet, and refuse one that is gone."""
    from raymerge.storage.s3_output import S3Output
    from raymerge.storage.writers import ShardState, Span, StagedItem, Target, Verified

    boto3.client("s3").create_bucket(Bucket="staged-parts")
    out = S3Output("s3://staged-parts/x", {})
    handles = out.prepare([("model.safetensors", 6 << 20)])
    target, span = Target("model.safetensors", handles[0], 6 << 20), Span(1, 0, 5 << 20)
    assert out.verify_staged(target, []) == Verified(ShardState.STAGED, frozenset())
    etag = out.write(target, span, memoryview(b"\0" * (5 << 20)))
    assert out.verify_staged(target, [StagedItem(0, span, 0, etag)]) == Verified(ShardState.STAGED, frozenset({0}))
    # A part is verified by its ETag and its size, never by the journal's word alone.
    assert out.verify_staged(target, [StagedItem(0, span, 0, '"other"'), StagedItem(1, Span(1, 0, 4 << 20), 0, etag),
                                      StagedItem(2, Span(2, 5 << 20, 6 << 20), 0, etag),
                                      StagedItem(3, span, 0, None)]).items == frozenset()
    out.abort(["model.safetensors"], handles)
    assert out.verify_staged(target, [StagedItem(0, span, 0, etag)]) == Verified(ShardState.GONE)


def test_mergekit_task_arithmetic_file_s3_to_s3(ray_local, s3_trio, tmp_path):
    """A mergekit file naming S3 models, run by `raymerge run` into S3, in mergekit's order."""
    import subprocess
    import sys

    import torch

    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(f"""merge_method: task_arithmetic
base_model: s3://{BUCKET}/base
models:
  - model: s3://{BUCKET}/cp
    parameters: {{weight: 1.0}}
  - model: s3://{BUCKET}/chat
    parameters: {{weight: [0.25, 0.75]}}
dtype: float32
out_dtype: bfloat16
""")
    r = subprocess.run([sys.executable, "-m", "raymerge", "run", str(cfg), "--out", f"s3://{BUCKET}/mk",
                        "--item-size", "5MiB", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _download("mk", str(tmp_path / "out"))
    local = {role: load_folder(path) for role, path in s3_trio.items()}
    want = {}
    for name, base in local["base"].items():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        weight = 0.25 if layer in (None, "0") else 0.75  # two layers: t = 0 and t = 1; others take t = 0
        b = base.float()
        mixed = (local["cp"][name].float() - b) * 1.0 + (local["chat"][name].float() - b) * torch.tensor(weight)
        want[name] = (b + mixed).to(torch.bfloat16)
    assert_bit_identical(load_folder(str(tmp_path / "out")), want)
