"""A model hub on 127.0.0.1: the file API `huggingface_hub` uses, serving folders as repositories.

    with LoopbackHub({"dermaray-test/tiny-llama": folder}) as hub:
        env = {"HF_ENDPOINT": hub.url}   # for a process that fetches models
        hub.requests                     # every (method, path) served, to count what a run asked for

A repository is a folder (its one revision, "main"), or {revision: folder} for several: a branch or
tag name, answered with its own commit hash, which the file requests then name.

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

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit of "main"


def commit(revision: str) -> str:
    return COMMIT if revision == "main" else hashlib.sha1(revision.encode()).hexdigest()


class LoopbackHub:
    def __init__(self, repos: dict[str, Path | dict[str, Path]]):
        self.revisions: dict[str, dict[str, Path]] = {}  # repo -> commit -> folder
        self.names: dict[str, dict[str, str]] = {}  # repo -> revision name or commit -> commit
        for repo, folders in repos.items():
            folders = folders if isinstance(folders, dict) else {"main": folders}
            self.revisions[repo] = {commit(rev): Path(f) for rev, f in folders.items()}
            self.names[repo] = {**{rev: commit(rev) for rev in folders}, **{c: c for c in self.revisions[repo]}}
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

    def files(self, repo: str, revision: str = "main") -> list[str]:
        root = self._root(repo, revision)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _root(self, repo: str, revision: str) -> Path:
        return self.revisions[repo][self.names[repo][revision]]

    def _serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        raw = urlsplit(request.path).path  # split before unquoting: a revision ("refs/pr/1") arrives quoted whole
        path = unquote(raw)
        self.requests.append((request.command, path))
        for repo, names in self.names.items():
            for api in ("revision", "tree"):
                prefix = f"/api/models/{repo}/{api}/"
                revision = unquote(raw.removeprefix(prefix).split("/")[0]) if raw.startswith(prefix) else None
                if revision in names:
                    files = self.files(repo, revision)
                    if api == "revision":
                        info = {"id": repo, "sha": names[revision], "siblings": [{"rfilename": f} for f in files]}
                        return self._send(request, json.dumps(info).encode(), body)
                    root = self._root(repo, revision)
                    tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": _oid(root / f)} for f in files]
                    return self._send(request, json.dumps(tree).encode(), body)
            if raw.startswith(f"/{repo}/resolve/"):
                revision, name = map(unquote, raw.removeprefix(f"/{repo}/resolve/").split("/", 1))
                file = self._root(repo, revision) / name if revision in names else None
                if file is not None and file.is_file():
                    headers = {"X-Repo-Commit": names[revision], "ETag": f'"{_oid(file)}"'}
                    return self._send(request, file.read_bytes(), body, headers)
        request.send_response(404)
        request.send_header("X-Error-Code", "RevisionNotFound" if "/revision/" in path else "EntryNotFound")
        request.send_header("Content-Length", "0")
        request.end_headers()

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        request.send_response(200)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)


def _oid(file: Path) -> str:
    return hashlib.sha1(file.read_bytes()).hexdigest()
