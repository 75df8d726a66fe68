"""A Hugging Face hub on 127.0.0.1: the part of its HTTP API `snapshot_download` uses.

huggingface_hub 2.4 (read from its source) downloads a repo into a local folder with:

    GET  /api/models/{repo}/revision/{revision}   repo info: its "sha" is the commit
    GET  /api/models/{repo}/tree/{commit}         the file list (one page: no Link header)
    HEAD /{repo}/resolve/{commit}/{file}          X-Repo-Commit and ETag, which it must
                                                  have; the size from Content-Length; an LFS
                                                  file's sha256 and size as X-Linked-Etag
                                                  and X-Linked-Size
    GET  /{repo}/resolve/{commit}/{file}          the bytes, as many as the HEAD announced

It records the commit and the ETag (an LFS file's sha256, a small file's git blob
sha1) beside each file in <local_dir>/.cache/huggingface/download/. Nothing here
announces Xet storage (no X-Xet-Hash header, no xetHash in the tree), so the client
takes its plain HTTP path even with hf_xet installed. The real hub redirects an LFS
file to a CDN host and the client reads the same headers from that redirect; this
server answers itself. Errors carry the hub's X-Error-Code (RepoNotFound, ...),
which the client turns into its own exception types.

`isolate_huggingface_hub` points the installed client here and keeps it off the
network and out of ~/.cache/huggingface.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import ipaddress
import json
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The hub's ETag for a file kept in git (not LFS): git's object id of the blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One model repo at one commit. `lfs` maps the files kept in LFS to the sha256 the
    hub announces for them: the real one unless a test says otherwise."""

    files: dict[str, bytes]
    lfs: dict[str, str] = field(default_factory=dict)
    commit: str = "0" * 40

    @classmethod
    def of(cls, files: dict[str, bytes], *, lfs: tuple[str, ...] = ()) -> HubRepo:
        commit = hashlib.sha1(json.dumps({n: sha256(d) for n, d in files.items()}).encode())
        return cls(dict(files), {n: sha256(files[n]) for n in lfs}, commit.hexdigest())

    def etag(self, name: str) -> str:
        return self.lfs[name] if name in self.lfs else git_blob_sha1(self.files[name])

    def tree(self) -> list[dict]:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if name in self.lfs:
                entry["lfs"] = {"oid": self.lfs[name], "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


_Reply = tuple[int, dict[str, str], bytes]


class Hub:
    """The server's state: its repos by id, and every request as (method, path, status)."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.on_request: Callable[[str, str], None] = lambda method, path: None
        self.url = ""

    def fetched(self) -> list[str]:
        """The files whose bytes were asked for (GET .../resolve/...), in order."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1]
                for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]

    def route(self, path: str) -> _Reply:
        """(status, headers, body) for a GET of `path`; a HEAD sends the same less the body."""
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path):
            repo_id, endpoint, revision = m.groups()
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo_id, revision, name = m.groups()
            endpoint = "resolve"
        else:
            return _error(404, "NotFound")
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound")
        if revision not in ("main", repo.commit):
            return _error(404, "RevisionNotFound")
        if endpoint == "revision":
            siblings = [{"rfilename": n} for n in repo.files]
            return _json({"id": repo_id, "sha": repo.commit, "siblings": siblings})
        if endpoint == "tree":
            return _json(repo.tree())
        if name not in repo.files:
            return _error(404, "EntryNotFound", {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"'}
        if name in repo.lfs:
            headers["X-Linked-Etag"] = f'"{repo.lfs[name]}"'
            headers["X-Linked-Size"] = str(len(repo.files[name]))
        return 200, headers, repo.files[name]


def _json(value) -> _Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> _Reply:
    body = json.dumps({"error": code}).encode()
    headers = {"X-Error-Code": code, "Content-Type": "application/json", **(headers or {})}
    return status, headers, body


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0 (http.server's default): one request per connection, so shutting the
    # server down leaves no kept-alive connection in a handler thread.

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer(send_body=True)

    def do_HEAD(self):  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        hub: Hub = self.server.hub
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        hub.on_request(self.command, path)
        status, headers, body = hub.route(path)
        hub.requests.append((self.command, path, status))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


class HubServer:
    """`with HubServer() as hub:` serves `hub` on 127.0.0.1 (a free port) from a thread."""

    def __enter__(self) -> Hub:
        self.hub = Hub()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.hub = self.hub
        self.hub.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def isolate_huggingface_hub(monkeypatch, *, endpoint: str, home: Path) -> list[str]:
    """Point the installed huggingface_hub at `endpoint`, its cache and token at `home`,
    with telemetry off and offline mode off; refuse any look-up of or connection to
    another host and return the list of them (empty if all is well). Closes its HTTP
    session, so the next one is made under this environment.

    huggingface_hub reads HF_ENDPOINT, HF_HOME and the rest once, when
    `huggingface_hub.constants` is imported, so setting the variables is not enough: a
    fresh copy of that module is run under the test's environment and its values
    replace the imported ones. With telemetry on, building the User-Agent would fetch
    {ENDPOINT}/api/agent-harnesses and cache it in HF_HOME.
    """
    from huggingface_hub import close_session, constants

    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGINGFACE_", "HUGGING_FACE_")) or name.lower() in (
                "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    spec = importlib.util.spec_from_file_location("_fresh_hf_constants", constants.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.lstrip("_").isupper():
            monkeypatch.setattr(constants, name, value)
    assert constants.ENDPOINT == endpoint and not constants.is_offline_mode()
    assert Path(constants.HF_HUB_CACHE).is_relative_to(home)

    refused: list[str] = []  # hosts looked up or connected to beyond this machine
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def lookup_local_only(host, *args, **kwargs):
        if host is not None and not _is_loopback(host if isinstance(host, str) else host.decode()):
            refused.append(str(host))
            raise socket.gaierror(f"test: no look-ups beyond 127.0.0.1 ({host})")
        return getaddrinfo(host, *args, **kwargs)

    def connect_local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refused.append(str(address[0]))
            raise ConnectionRefusedError(f"test: no connections beyond 127.0.0.1 ({address[0]})")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup_local_only)
    monkeypatch.setattr(socket.socket, "connect", connect_local_only)
    close_session()  # a client made earlier may hold another environment's proxies
    return refused


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: connect() would look it up
        return host == "localhost"
