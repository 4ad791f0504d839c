"""Shared fixtures: one local Ray and one moto S3 server per test session, and tiny Llama trios
built with transformers' own model code (independent of raymerge's synthetic maker)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

# Loopback only, no auth prompts: set before Ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Fake credentials for moto: never real ones in tests.
for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                   "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[key] = value
os.environ.pop("AWS_PROFILE", None)

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with a short private temp dir."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rmt-", dir="/tmp")
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, _node_ip_address="127.0.0.1",
             num_cpus=2, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server over HTTP on 127.0.0.1 (moto's server mode); AWS_ENDPOINT_URL points at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output location (storage.writers.open_output) in a new folder, and in a new bucket on
    the session's S3 server."""
    import time

    import boto3

    from raymerge.storage.writers import open_output

    if request.param == "local":
        return open_output(str(tmp_path / "out"), {})
    request.getfixturevalue("s3_server")
    bucket = f"out-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return open_output(f"s3://{bucket}/out", {})


def make_llama_trio(root: str, *, hidden: int = 64, layers: int = 2, vocab: int = 512, intermediate: int = 128,
                    max_shard_size: str = "100KB", seed: int = 0, roles=("base", "chat", "cp"),
                    cp_extra_rows: int = 0, dtype: str = "bfloat16") -> dict[str, str]:
    """Checkpoints saved by transformers' save_pretrained (bf16, sharded): a base, and every other
    role the base plus its own noise, so that each vector is distinct and not zero. With
    `cp_extra_rows`, cp's vocabulary is expanded (new embedding and head rows, as after continual
    pre-training on a new language) and its config says so. `dtype`: the tensors' (torch's name)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(v: int) -> LlamaConfig:
        return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                           max_position_embeddings=128, tie_word_embeddings=False)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(vocab)).to(getattr(torch, dtype))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    folders = {}
    for role in roles:
        if role == "cp" and cp_extra_rows:
            model = LlamaForCausalLM(config(vocab + cp_extra_rows)).to(getattr(torch, dtype))
        noise = 0.0 if role == "base" else 0.01
        with torch.no_grad():
            for name, p in model.state_dict().items():
                new = (base_state[name].float() + noise * torch.randn(base_state[name].shape)).to(p.dtype)
                if p.shape != new.shape:  # expanded vocabulary: fresh rows after the shared ones
                    new = torch.cat([new, (0.02 * torch.randn(p.shape[0] - new.shape[0], *p.shape[1:])).to(p.dtype)])
                p.copy_(new)
        folders[role] = os.path.join(root, role)
        model.save_pretrained(folders[role], max_shard_size=max_shard_size)
        with open(os.path.join(folders[role], "tokenizer_config.json"), "w") as f:
            f.write('{"from": "%s"}' % role)
    return folders


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory) -> dict[str, str]:
    return make_llama_trio(str(tmp_path_factory.mktemp("trio")))


@pytest.fixture
def cli_main():
    """raymerge.cli.main in this process (on the session's Ray), its logging settings put back after."""
    import logging

    from raymerge import cli

    loggers = [logging.getLogger(n) for n in ("raymerge", "raymerge.progress")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield cli.main
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
