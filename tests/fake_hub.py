"""A Hugging Face–compatible hub on 127.0.0.1 that serves local folders as repos, slowly.

No machine here reaches the real hub, so the download path (huggingface_hub's snapshot and file
downloads, with their progress) is tested against this: the same HTTP routes the client uses
(repo info, tree listing, HEAD and GET of /resolve/), plain HTTP downloads (no xet). Files are
sent in chunks with a pause between them so a download lasts long enough to be watched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub:
    def __init__(self, repos: dict[str, Path], chunk_bytes: int, pause_s: float) -> None:
        self.repos = repos
        self.chunk_bytes = chunk_bytes
        self.pause_s = pause_s
        self.requests: list[str] = []  # "METHOD path", for tests that check what was fetched

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _handler(hub: _Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: the test output stays readable
            pass

        def _json(self, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self) -> None:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> tuple[str, str, list[str]] | None:
            """(kind, repo, rest) for /api/models/{org}/{name}/{kind}/... and /{org}/{name}/resolve/..."""
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                return parts[4], f"{parts[2]}/{parts[3]}", parts[5:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return "resolve", f"{parts[0]}/{parts[1]}", parts[4:]
            return None

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            self._serve(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(send_body=False)

        def _serve(self, send_body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            route = self._route()
            if route is None or route[1] not in hub.repos:
                return self._missing()
            kind, repo, rest = route
            files = hub.files(repo)
            if kind == "revision":
                return self._json(
                    {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                     "siblings": [{"rfilename": name} for name in files]}
                )
            if kind == "tree":
                return self._json(
                    [{"type": "file", "path": name, "size": path.stat().st_size,
                      "oid": hashlib.sha1(name.encode()).hexdigest()} for name, path in files.items()]
                )
            name = "/".join(rest)
            if kind != "resolve" or name not in files:
                return self._missing()
            data = files[name].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if not send_body:
                return
            for start in range(0, len(data), hub.chunk_bytes):
                self.wfile.write(data[start:start + hub.chunk_bytes])
                self.wfile.flush()
                time.sleep(hub.pause_s)

    return Handler


@contextmanager
def serving_hub(repos: dict[str, Path], chunk_bytes: int = 64 * 1024, pause_s: float = 0.0) -> Iterator[tuple[str, _Hub]]:
    """Serve `repos` (repo id -> local folder) on a free port: yields (endpoint URL, hub)."""
    hub = _Hub(repos, chunk_bytes, pause_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hub
    finally:
        server.shutdown()
        server.server_close()
