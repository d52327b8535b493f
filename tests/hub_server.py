"""A model hub on 127.0.0.1: the file API `huggingface_hub` uses, serving folders as repositories.

    with LoopbackHub({"dermaray-test/tiny-llama": folder}) as hub:
        env = {"HF_ENDPOINT": hub.url}   # for a process that fetches models
        hub.requests                     # every (method, path) served, to count what a run asked for

Endpoints (those `snapshot_download` and `hf_hub_download` call): the revision info
(`/api/models/<repo>/revision/<rev>`), the recursive tree listing (`/api/models/<repo>/tree/<rev>`)
and the files (`HEAD` / `GET /<repo>/resolve/<rev>/<path>`, with `X-Repo-Commit` and `ETag`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision every repository has


class LoopbackHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        for repo in self.repos:
            if path.startswith(f"/api/models/{repo}/revision/"):
                siblings = [{"rfilename": f} for f in self.files(repo)]
                return self._send(request, json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode(), body)
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [
                    {"type": "file", "path": f, "size": (self.repos[repo] / f).stat().st_size, "oid": self._oid(repo, f)}
                    for f in self.files(repo)
                ]
                return self._send(request, json.dumps(tree).encode(), body)
            if path.startswith(f"/{repo}/resolve/"):
                name = path.removeprefix(f"/{repo}/resolve/").split("/", 1)[1]
                file = self.repos[repo] / name
                if file.is_file():
                    return self._send(
                        request, file.read_bytes(), body, {"X-Repo-Commit": COMMIT, "ETag": f'"{self._oid(repo, name)}"'}
                    )
        request.send_response(404)
        request.send_header("X-Error-Code", "EntryNotFound")
        request.send_header("Content-Length", "0")
        request.end_headers()

    def _oid(self, repo: str, name: str) -> str:
        return hashlib.sha1((self.repos[repo] / name).read_bytes()).hexdigest()

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        request.send_response(200)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)
