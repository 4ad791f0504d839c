"""A small stand-in of the Hugging Face Hub's HTTP API on 127.0.0.1, token-protected, for tests.

It serves model repositories from snapshots of local folders, with branches that point at
commits (a test can move a branch to a new commit), and implements exactly what
`huggingface_hub.HfFileSystem` (2.x) calls to list, stat and read a model repository:

    GET  /api/models/{org}/{name}[/revision/{rev}]          repo info (the commit sha)
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]       listing (no pagination: repos are small)
    POST /api/models/{org}/{name}/paths-info/{rev}          info of given paths (form: paths=..., expand=...)
    GET  /{org}/{name}/resolve/{rev}/{path}                 file bytes; with Range: 206, exactly those bytes
    HEAD /{org}/{name}/resolve/{rev}/{path}

As the Hub does for private and gated repos, a request without `Authorization: Bearer <token>`
gets 401 with `X-Error-Code: RepoNotFound` (huggingface_hub raises RepositoryNotFoundError), and one
with another token 401 "Invalid credentials in Authorization header". Files carry no xet hash, so
huggingface_hub reads them over plain HTTP. Every byte of file content served is counted, per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubStandIn:
    """The server's state: repositories, branches, commits, and what it served."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.commits: dict[str, dict[str, bytes]] = {}  # sha -> {path: content}
        self.branches: dict[str, dict[str, str]] = {}  # repo -> {branch: sha}
        self.served: Counter[str] = Counter()  # "org/name@sha/path" -> file bytes served
        self.requests: list[str] = []  # "METHOD path [range]" of every request
        self.delay = 0.0  # seconds each file read waits before answering (to see reads overlap)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def publish(self, repo: str, folder: str, branch: str = "main") -> str:
        """Commit the files of `folder` to `repo` and point `branch` at that commit; its sha."""
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
        h = hashlib.sha1(repo.encode())
        for name, data in files.items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        sha = h.hexdigest()
        with self._lock:
            self.commits[sha] = files
            self.branches.setdefault(repo, {})[branch] = sha
        return sha

    @property
    def total_served(self) -> int:
        return sum(self.served.values())

    def point_driver_at_it(self, monkeypatch) -> None:
        """This process (the driver) reaches the stand-in with the token; Ray's workers, started
        earlier, have neither in their environment. Counts start from zero."""
        monkeypatch.setenv("HF_TOKEN", self.token)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        self.reset_counts()

    def reset_counts(self) -> None:
        with self._lock:
            self.served.clear()
            self.requests.clear()

    def commit_of(self, repo: str, rev: str) -> str | None:
        refs = self.branches.get(repo)
        if refs is None:
            return None
        if rev in refs:
            return refs[rev]
        return rev if rev in refs.values() else None

    def count(self, key: str | None, n: int, line: str) -> None:
        with self._lock:
            if key is not None:
                self.served[key] += n
            self.requests.append(line)


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data),
             "path": path}
    if path.endswith(".safetensors"):  # stored in LFS on the Hub
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _children(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict] | None:
    """Tree entries under `folder` ("" for the root); None when it is not a folder."""
    prefix = f"{folder}/" if folder else ""
    out, dirs = [], set()
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            dirs.add(prefix + rest.split("/", 1)[0])
        else:
            out.append(_entry(path, data))
    out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(dirs)]
    return out if out or not folder else None


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the test reads hub.requests instead
            pass

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            routes = [
                ("GET", rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$", self._info),
                ("GET", rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", self._tree),
                ("POST", rf"^/api/models/{REPO}/paths-info/(?P<rev>[^/]+)$", self._paths_info),
                ("GET", rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve),
                ("HEAD", rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve),
            ]
            for verb, pattern, handle in routes:
                m = re.match(pattern, path)
                if m and verb == method:
                    if not self._authorized():
                        return
                    repo, rev = m.group("repo"), unquote(m.groupdict().get("rev") or "main")
                    sha = hub.commit_of(repo, rev)
                    if repo not in hub.branches:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if sha is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return handle(method, repo, sha, unquote(m.groupdict().get("path") or ""), query, body)
            self._error(404, None, "Not found")

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization")
            if given is None:
                self._error(401, "RepoNotFound", "Invalid username or password.")
                return False
            if given != f"Bearer {hub.token}":
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        def _info(self, method, repo, sha, _path, _query, _body) -> None:
            files = hub.commits[sha]
            self._json({"id": repo, "modelId": repo, "sha": sha, "private": True, "gated": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})

        def _tree(self, method, repo, sha, path, query, _body) -> None:
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            entries = _children(hub.commits[sha], path.strip("/"), recursive)
            if entries is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {sha}")
            self._json(entries)

        def _paths_info(self, method, repo, sha, _path, _query, body) -> None:
            files = hub.commits[sha]
            wanted = parse_qs(body.decode()).get("paths", [])
            out = []
            for p in wanted:
                p = p.strip("/")
                if p in files:
                    out.append(_entry(p, files[p]))
                elif any(f.startswith(p + "/") for f in files):
                    out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
            self._json(out)

        def _resolve(self, method, repo, sha, path, _query, _body) -> None:
            data = hub.commits[sha].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {sha}")
            start, end, status = 0, len(data), 200
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if not m or int(m.group(1)) >= len(data):
                    return self._error(416, None, "Range Not Satisfiable")
                start = int(m.group(1))
                end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                status = 206
            chunk = data[start:end]
            time.sleep(hub.delay)
            self.send_response(status)
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{_entry(path, data)["oid"]}"')
            self.send_header("X-Repo-Commit", sha)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if method == "GET":
                self.wfile.write(chunk)
                hub.count(f"{repo}@{sha}/{path}", len(chunk), f"GET {self.path} {rng or ''}")

        def _json(self, obj) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            hub.count(None, 0, f"{self.command} {self.path}")

        def _error(self, status: int, code: str | None, message: str) -> None:
            raw = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

    return Handler
