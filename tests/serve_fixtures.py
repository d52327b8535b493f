"""The dermaray Serve app on the test Ray cluster, over real HTTP on 127.0.0.1 (one per test session)."""

from __future__ import annotations

import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

API_KEY = "test-clinic-key"
APP_NAME = "dermaray"


@dataclass
class ServedApp:
    url: str
    api_key: str
    root: Path  # the artifacts: lesions/, grounding/, index/, ...
    overrides: list[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    def schemathesis(self, folder: Path, max_seconds: int = 45) -> str:
        """Property-based requests from the app's OpenAPI spec (examples, boundaries, fuzzing, stateful links),
        bounded in examples and time; asserts every operation was tested and no answer was a 5xx; its summary."""
        import re
        import shutil
        import subprocess
        import sys

        st = shutil.which("st", path=str(Path(sys.executable).parent))
        assert st, "schemathesis's `st` command is missing from the venv (pip install -e '.[dev]')"
        command = [
            st,
            "run",
            f"{self.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-H",
            f"X-API-Key: {self.api_key}",
            "--max-examples",
            "5",
            "--seed",
            "0",
            "--max-time",
            str(max_seconds),
            "--request-timeout",
            "60",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(folder),
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=folder)  # its cache dir lands there
        summary = run.stdout[-3000:]
        assert run.returncode == 0, summary
        selected, tested = re.search(r"Selected: (\d+)/", summary), re.search(r"Tested: (\d+)", summary)
        assert selected and tested and int(tested.group(1)) == int(selected.group(1)) >= 10, summary  # every operation
        assert re.search(r"\d+ generated, \d+ passed", summary) and "failed" not in summary.lower(), summary
        return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, cache_dir: Path, extra_overrides: list[str] | None = None, **artifacts) -> ServedApp:
    """The app over artifacts built by serve_artifacts.build(root, cache_dir, **artifacts)."""
    from ray import serve

    from dermaray.config import load_config
    from serve.app import app_from_config
    from tests import serve_artifacts

    key_file = root / "api-key"  # the key as a cluster gives it: a secret file the ingress reads on its node
    key_file.write_text(API_KEY + "\n")
    overrides = serve_artifacts.build(root, cache_dir, **artifacts) + [
        f"serve.api_key_file={key_file}",
        "serve.max_k=20",
        "serve.max_upload_bytes=1048576",
        "serve.max_adapters_per_replica=1",
        "serve.max_images=3",
        *(extra_overrides or []),
    ]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(app_from_config(load_config(None, overrides)), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:  # serve.run returns once deployments are healthy; the proxy may need a moment more
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError as err:
            if time.time() > deadline:
                raise RuntimeError("the Serve app did not answer /healthz within 180 s") from err
            time.sleep(0.5)
    return ServedApp(url, API_KEY, root, overrides)


def stop() -> None:
    from ray import serve

    serve.shutdown()
