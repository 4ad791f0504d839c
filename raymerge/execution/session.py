"""The Ray session a run uses: the Ray this process joined, a cluster's address, or a private
local Ray started for this run alone."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

_TOKEN = secrets.token_hex(32)  # one per process: Ray's token loader caches what it first read


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray this process already joined; else join `address` or RAY_ADDRESS (inside
    `ray job submit`); else start a private local Ray for this run and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = None
    address = address or os.environ.get("RAY_ADDRESS")
    local = prefer_loopback(address)
    unset = [k for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k not in os.environ]  # set for this run only
    if address:
        ray.init(address=address, logging_level=logging.WARNING, **({"_node_ip_address": "127.0.0.1"} if local else {}))
    else:
        # A short private temp dir (Ray's socket paths must stay short; mkdtemp makes it 0700) on
        # loopback, with Ray's token authentication: no other local user can join it and run code
        # that reads the credentials its workers hold.
        temp_dir = tempfile.mkdtemp(prefix="raymerge-", dir="/tmp")
        _private_token()
        # Ray warns on every start that it turned token authentication on; that is the point here.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        for key in unset:
            os.environ.pop(key, None)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _private_token() -> None:
    """Ray's default for a new local cluster is token authentication (RAY_AUTH_MODE unset); give it
    a random token held only in this process's environment (inherited by the cluster it starts)
    instead of one it would write to ~/.ray. An explicit RAY_AUTH_MODE (tests may disable it) or
    token is respected."""
    if "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ:
        return
    os.environ["RAY_AUTH_TOKEN"] = _TOKEN


def prefer_loopback(address: str | None) -> bool:
    """For a private local Ray or a cluster on this machine, make Ray use loopback, not the
    interface address. Ray reads this at import: the CLI calls this before importing Ray."""
    host = address.split("://")[-1].rsplit(":", 1)[0] if address else None
    local = host is None or host in ("127.0.0.1", "localhost", "::1", "[::1]")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return local
