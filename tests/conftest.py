"""Shared fixtures: one real local Ray cluster and one real S3 endpoint (moto's server) per run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import PLANTED_DEFECTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The moto server's credentials reach s3fs through the standard chain (as an instance role would on a
# cluster), set before the session's Ray cluster starts so its workers inherit them: never in a config.
MOTO_KEY, MOTO_SECRET = "dermaray-moto-key", "dermaray-moto-secret-Zq7vKp"
os.environ.setdefault("AWS_ACCESS_KEY_ID", MOTO_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", MOTO_SECRET)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from dermaray.config import RayConfig
    from jobs.common import init_ray

    init_ray(RayConfig(num_cpus=2, log_to_driver=False))
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, in its own process so Ray workers reach it over HTTP."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception as err:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start") from err
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_options(s3_endpoint):
    """fsspec storage options for the test endpoint (credentials from the environment), with a `dermaray` bucket created."""
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    s3fs.S3FileSystem(**options).mkdir("dermaray")
    return options


@pytest.fixture(scope="session")
def synthetic_on_s3(ray_cluster, s3_options):
    """2,000 synthetic lesions with planted defects, in the ISIC 2024 layout on S3."""
    from dermaray.config import load_config
    from jobs import synth

    overrides = ["synth.n_lesions=2000", "synth.output=s3://dermaray/synth/isic", "synth.shard_size=250"]
    overrides += [f"synth.corrupt.{kind}={count}" for kind, count in PLANTED_DEFECTS.items()]
    cfg = load_config(None, overrides)
    cfg.storage_options = s3_options
    return synth.run(cfg)


@pytest.fixture(scope="session")
def ingested_on_s3(synthetic_on_s3, s3_options):
    """Their canonical lesion table at s3://dermaray/ingest/lesions."""
    from dermaray.config import load_config
    from jobs import ingest

    cfg = load_config(
        None, ["ingest.input=s3://dermaray/synth/isic", "ingest.output=s3://dermaray/ingest", "ingest.batch_size=128"]
    )
    cfg.storage_options = s3_options
    return ingest.run(cfg)


@pytest.fixture(scope="session")
def served_app(ray_cluster, tmp_path_factory):
    """The Serve app (retrieval, generation, ingress) over tiny real artifacts, with an API key set."""
    from pathlib import Path

    from tests import serve_fixtures

    app = serve_fixtures.start(tmp_path_factory.mktemp("serve"), Path(".cache/models").resolve())
    yield app
    serve_fixtures.stop()
