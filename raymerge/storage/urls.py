"""URLs and the filesystems behind them.

Workers get URLs and storage options, never filesystem objects: fsspec caches one filesystem
per process and options, and credentials stay out of what gets logged.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from raymerge.errors import InputError
from raymerge.text import redact as text_redact

# The standard AWS variables forwarded from the driver to workers, so that a worker on another
# node talks to the same endpoint with the same identity as the driver that planned the run.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
# The same, per backend: credentials and endpoint settings (names, or prefixes ending in "_").
BACKEND_ENV = {
    "s3": AWS_ENV,
    "hf": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"),
    "gs": ("GOOGLE_", "STORAGE_EMULATOR_HOST", "GCSFS_"),
    "gcs": ("GOOGLE_", "STORAGE_EMULATOR_HOST", "GCSFS_"),
    "az": ("AZURE_STORAGE_", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"),
    "abfs": ("AZURE_STORAGE_", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"),
    "abfss": ("AZURE_STORAGE_", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"),
}


def protocol(url: str) -> str:
    """'file' for local paths and file:// URLs, else the URL scheme ('s3', 'gs', 'hf', ...)."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    scheme = m.group(1).lower() if m else "file"
    return "s3" if scheme in ("s3a", "s3n") else scheme


def one_scheme(url: str) -> str:
    """`url` spelled with one scheme per store: every protocol fsspec implements with the same
    class (gs and gcs, az and abfs, file and local, s3 and s3a) becomes the first of them in sorted
    order, so that locations are compared by what they are."""
    scheme = protocol(url)
    if scheme == "file":
        return url
    rest = url.split("://", 1)[1]
    return f"{_family(scheme)}://{rest}"


def _family(scheme: str) -> str:
    implementations = _implementations()
    cls = implementations.get(scheme)
    return min(p for p, c in implementations.items() if c == cls) if cls is not None else scheme


def _implementations() -> dict[str, object]:
    """Protocol -> the class fsspec opens it with: the live registry (classes registered at run
    time, or imported already) over the table of known implementations, whose class names are
    resolved where their module is imported already (s3fs.S3FileSystem is s3fs.core.S3FileSystem)
    and compared as names otherwise; nothing is imported here."""
    from fsspec.registry import known_implementations, registry

    found: dict[str, object] = {p: _class(spec.get("class", "")) for p, spec in known_implementations.items()}
    return found | dict(registry)


def _class(name: str) -> object:
    module, _, attrs = name.rpartition(":") if ":" in name else name.rpartition(".")
    obj = sys.modules.get(module)
    for attr in attrs.split(".") if obj is not None else ():
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, type) else name


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
    options = dict(storage_options or {})
    if protocol(url) == "file":  # reads open regular files only, never blocking (storage.localfs)
        from raymerge.storage.localfs import SafeLocalFileSystem

        return SafeLocalFileSystem(), local_path(url)
    if protocol(url) == "hf" and "endpoint" not in options and os.environ.get("HF_ENDPOINT"):
        # huggingface_hub reads HF_ENDPOINT once, at import: a worker that imported it before the
        # driver's settings were applied would still talk to huggingface.co.
        options["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    try:
        return url_to_fs(normalize(url), **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"{redact(url)}: cannot open this URL ({e}); install the fsspec package for "
                         "its protocol (s3fs, gcsfs, huggingface_hub) or check --storage-options") from e


def is_inside(inner: str, outer: str) -> bool:
    """True when `inner` is `outer` or lies under it."""
    a, b = normalize(inner), normalize(outer)
    return a == b or a.startswith(b + "/")


def redact(text: str) -> str:
    """Hide user:password@ parts of URLs in anything shown or stored."""
    return text_redact(text)


def unpinned(url: str) -> str:
    """`url` without the commit a Hub URL was pinned to (hf://org/name@<sha>/f -> hf://org/name/f):
    what stays the same when a branch moves, to name the input that changed."""
    m = re.match(r"^(hf://(?:(?:datasets|spaces)/)?[^/@]+/[^/@]+)@(?:refs/(?:pr|convert)/[^/]+|[^/]+)(/.*)?$", url)
    return m.group(1) + (m.group(2) or "") if m else url


def worker_env(input_urls: list[str], out_url: str | None) -> dict[str, str]:
    """The driver's settings that workers on any node need for the backends in use: credentials
    and endpoints (as the driver resolved them), and RAYMERGE_ settings. Secrets: pass them only
    to workers (actor arguments), never to logs, the manifest or a command line."""
    used = {protocol(u) for u in [*input_urls, *([out_url] if out_url else [])]}
    names = tuple(n for p in sorted(used) for n in BACKEND_ENV.get(p, ()))
    env = {k: v for k, v in os.environ.items()
           if k.startswith("RAYMERGE_") or k in names or any(n.endswith("_") and k.startswith(n) for n in names)}
    if "hf" in used and not (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")):
        token = _hub_token()
        if token:
            env["HF_TOKEN"] = token  # from the driver's token file, which other nodes do not have
    return env


def _hub_token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()
