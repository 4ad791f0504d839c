"""URLs and the filesystems behind them.

Workers get URLs and storage options, never filesystem objects: fsspec caches one filesystem
per process and options, and credentials stay out of what gets logged.
"""

from __future__ import annotations

import os
import re
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from raymerge.errors import InputError

# The standard AWS variables forwarded from the driver to workers, so that a worker on another
# node talks to the same endpoint with the same identity as the driver that planned the run.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def protocol(url: str) -> str:
    """'file' for local paths and file:// URLs, else the URL scheme ('s3', 'gs', 'hf', ...)."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    scheme = m.group(1).lower() if m else "file"
    return "s3" if scheme in ("s3a", "s3n") else scheme


def local_path(url: str) -> str:
    """The absolute local path of a file URL or plain path."""
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def normalize(url: str) -> str:
    """One spelling per location: absolute local paths, no trailing slash."""
    if protocol(url) == "file":
        return local_path(url)
    return url.rstrip("/")


def join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the in-filesystem path for `url`."""
    try:
        return url_to_fs(normalize(url), **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise InputError(f"{redact(url)}: cannot open this URL ({e}); install the fsspec package for "
                         "its protocol (s3fs, gcsfs, huggingface_hub) or check --storage-options") from e


def is_inside(inner: str, outer: str) -> bool:
    """True when `inner` is `outer` or lies under it."""
    a, b = normalize(inner), normalize(outer)
    return a == b or a.startswith(b + "/")


def redact(text: str) -> str:
    """Hide user:password@ parts of URLs in anything shown or stored."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def aws_env() -> dict[str, str]:
    """The driver's AWS and RAYMERGE_ settings that workers on any node must share."""
    return {k: v for k, v in os.environ.items() if k in AWS_ENV or k.startswith("RAYMERGE_")}
