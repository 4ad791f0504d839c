"""Does every node that runs workers see the local paths as the driver does?

A cluster without a shared filesystem runs the driver on one node and workers on others: a local
input path may not exist there, or hold another file, and an output folder there is a different
folder. Before any work, each worker checks its node's view against the driver's: every local
input file (size, modification time, header digest) and the output's staging folder (a probe
file holding a random token that the driver wrote). A mismatch is refused (NodeViewError, exit 2)
naming the node and the path; --resume could never get past it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from dataclasses import dataclass

from raymerge.errors import NodeViewError
from raymerge.planning.plan import Plan
from raymerge.storage import urls
from raymerge.storage.localfs import open_regular

FIX = "put it on a filesystem every node mounts at the same path, or use s3:// (or hf://) URLs"


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: str
    size: int
    mtime: int  # whole seconds: copies made with their times kept still match
    header: str  # sha256 of the 8-byte length and the header JSON


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the driver sees: the local input files, and the probe in the output's staging folder."""

    files: tuple[LocalFile, ...] = ()
    out: str | None = None  # the local output folder, as the driver names it
    probe: str | None = None  # path of the probe file
    token: str = ""  # what the probe file holds


def driver_view(plan: Plan, out: str | None, probe: str | None, token: str) -> NodeView:
    files = tuple(_describe(urls.local_path(f.url)) for f in plan.files if urls.protocol(f.url) == "file")
    return NodeView(files, out, probe, token)


def local_inputs(plan: Plan) -> list[str]:
    """The paths of every local file the plan reads: input shards and the aux files it copies."""
    found = [f.url for f in plan.files] + [u for a in plan.aux_files for u in (a.source, a.patch_from) if u]
    return [urls.local_path(u) for u in found if urls.protocol(u) == "file"]


def _describe(path: str) -> LocalFile:
    with os.fdopen(open_regular(path), "rb") as f:  # what a node holds there may be a FIFO: never block
        st = os.fstat(f.fileno())
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(n, 100_000_000))).hexdigest()
    return LocalFile(path, st.st_size, int(st.st_mtime), digest)


def check_view(view: NodeView) -> None:
    """Raise NodeViewError when this node sees a local path differently from the driver."""
    where = node_name()
    for want in view.files:
        try:
            got = _describe(want.path)
        except OSError as e:
            raise NodeViewError(f"execute: node {where} cannot read the input {want.path} ({e.strerror}); "
                                f"every node that runs workers must see the same local inputs: {FIX}") from e
        if got != want:
            raise NodeViewError(f"execute: node {where} sees a different file at {want.path} than the driver "
                                f"does ({_difference(want, got)}); every node that runs workers must see the "
                                f"same local inputs: {FIX}")
    if view.probe:
        try:
            # opened for writing (workers write beside it), as a regular file that is no link
            with os.fdopen(open_regular(view.probe, os.O_RDWR, follow=False), "r+b") as f:
                seen = f.read(256).decode(errors="replace")
        except OSError as e:
            seen = f"({e.strerror})"
        if seen != view.token:
            raise NodeViewError(f"execute: node {where} does not see the output folder {view.out} as the driver does "
                                f"(the driver's probe file there reads {seen[:40]!r}); the output of a cluster run "
                                f"must be shared by every node that runs workers: {FIX}")


def _difference(want: LocalFile, got: LocalFile) -> str:
    if want.size != got.size:
        return f"{got.size} bytes, the driver's has {want.size}"
    if want.header != got.header:
        return "its safetensors header differs"
    return "its modification time differs"


def node_name() -> str:
    """This node as messages name it: its Ray address and host name."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (verify, tests)
        ip = "?"
    return f"{ip} ({socket.gethostname()})"
