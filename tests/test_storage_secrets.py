"""Credentials never travel in a config or a pickled filesystem: the standard chain, or a secrets file read on the node."""

from __future__ import annotations

import pickle

import pytest

from dermaray.config import load_config
from dermaray.storage import arrow_filesystem, read_bytes, with_secrets, write_bytes

SECRET = "secret-from-file-Jx81"


@pytest.mark.parametrize(
    "override",
    [
        "storage_options.secret=abc",
        "storage_options.key=abc",
        "storage_options.client_kwargs.aws_secret_access_key=abc",
        "models.store_options.token=abc",
    ],
)
def test_a_credential_in_the_config_is_refused_with_where_it_goes(override):
    with pytest.raises(ValueError, match="credentials do not go in a config.*secrets_file"):
        load_config(None, [override])


def test_secrets_file_options_are_read_where_the_filesystem_is_made(tmp_path):
    secrets = tmp_path / "s3.yaml"
    secrets.write_text(f"key: k\nsecret: {SECRET}\n")
    assert with_secrets({"endpoint_url": "http://x", "secrets_file": str(secrets)}) == {
        "endpoint_url": "http://x",
        "key": "k",
        "secret": SECRET,
    }
    with pytest.raises(FileNotFoundError, match="secrets_file .* cannot be read on this node"):
        with_secrets({"secrets_file": str(tmp_path / "absent.yaml")})


def test_a_pickled_arrow_filesystem_holds_no_secret_and_reads_the_file_again(s3_options, tmp_path, monkeypatch):
    """What Ray ships to other nodes (Ray Data reads, Ray Train's storage) is the URI and the options without secrets."""
    import botocore.exceptions

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # no chain: only the file can authenticate
        monkeypatch.delenv(name, raising=False)
    secrets = tmp_path / "s3.yaml"
    secrets.write_text(f"key: from-file\nsecret: {SECRET}\n")
    options = {**s3_options, "secrets_file": str(secrets)}
    write_bytes("s3://dermaray/secrets-test/a.txt", b"hello", options)

    fs, path = arrow_filesystem("s3://dermaray/secrets-test", options)
    blob = pickle.dumps(fs)
    assert SECRET.encode() not in blob and str(secrets).encode() in blob
    clone = pickle.loads(blob)
    with clone.open_input_stream(f"{path}/a.txt") as f:
        assert f.read() == b"hello"

    with pytest.raises((botocore.exceptions.NoCredentialsError, PermissionError, OSError)):
        read_bytes("s3://dermaray/secrets-test/a.txt", {**s3_options, "skip_instance_cache": True})
