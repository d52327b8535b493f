"""Serving cores without Serve: upload checks, limits, API key, body-size middleware, gallery shaping."""

from __future__ import annotations

import asyncio
import io
import pickle
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dermaray.config import load_config
from dermaray.schema import ATTRIBUTE_NAMES
from dermaray.serving.checks import (
    BodyLimit,
    RequestError,
    check_api_key,
    check_count,
    check_k,
    check_text,
    decode_upload,
)
from dermaray.serving.gallery import Gallery
from dermaray.serving.thumbnails import Thumbnails, thumbnail_jpeg, with_thumbnails, write_thumbnails

MB = 1024 * 1024


def encoded(fmt: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few hundred bytes (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as caught:
        fn(*args)
    return caught.value


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_upload(encoded(fmt), MB, 4096 * 4096)
    assert image.mode == "RGB" and image.size == (32, 24)


def test_uploads_refused_with_status_and_message() -> None:
    assert refused(decode_upload, b"", MB, 10**6).status == 422
    big = refused(decode_upload, encoded("PNG", (256, 256)), 50, 10**6)
    assert big.status == 413 and "limit is 50 bytes" in big.message
    text = refused(decode_upload, b"lesion_id,area_mm2\nISIC_1,12.5\n" * 10, MB, 10**6)
    assert text.status == 415 and "not an image" in text.message
    gif = refused(decode_upload, encoded("GIF"), MB, 10**6)
    assert gif.status == 415 and "GIF" in gif.message
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG")
    truncated = refused(decode_upload, buffer.getvalue()[: len(buffer.getvalue()) // 2], MB, 10**6)
    assert truncated.status == 422 and "truncated or corrupt" in truncated.message


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_header_only(30000, 30000)  # 900 megapixels declared in under 2 kB
    assert len(bomb) < 2048
    error = refused(decode_upload, bomb, MB, 4096 * 4096)
    assert error.status == 422 and "pixels" in error.message
    # Beyond PIL's own bomb threshold too (refused inside Image.open).
    assert refused(decode_upload, png_header_only(60000, 60000), MB, 4096 * 4096).status == 422


def test_messages_never_quote_the_upload() -> None:
    secret = b"patient note: 71 year old, lesion on the back"
    error = refused(decode_upload, secret, MB, 10**6)
    assert "patient" not in error.message and "71" not in error.message
    assert "back" not in refused(check_text, "x" * 50, 10).message


def test_limits_on_k_count_and_text() -> None:
    assert check_k(5, 10) == 5 and check_count(2, 4) == 2
    assert refused(check_k, 0, 10).status == 422 and refused(check_k, 11, 10).status == 422
    assert refused(check_count, 5, 4).status == 422
    assert check_text("  irregular border  ", 100) == "irregular border"
    assert refused(check_text, "   ", 100).status == 422


def test_api_key_is_optional_and_compared_exactly() -> None:
    check_api_key(None, None)
    check_api_key("", "anything")
    check_api_key("s3cret", "s3cret")
    assert refused(check_api_key, "s3cret", None).status == 401
    assert refused(check_api_key, "s3cret", "s3cre").status == 401


def test_request_error_survives_pickling() -> None:
    copy = pickle.loads(pickle.dumps(RequestError(415, "not an image")))
    assert (copy.status, copy.message) == (415, "not an image")


def _run_asgi(middleware: BodyLimit, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, int]:
    """(status, body, bytes the app read) for one request through the middleware."""
    read = 0

    async def app(scope, receive, send):
        nonlocal read
        while True:
            message = await receive()
            read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware.app = app
    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1} for i, c in enumerate(body_chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": "http", "headers": headers}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), read


def test_body_limit_refuses_declared_and_streamed_oversize_bodies() -> None:
    limit = BodyLimit(None, max_bytes=1000)
    assert _run_asgi(limit, [b"x" * 500], [(b"content-length", b"500")])[:2] == (200, b"ok")
    status, body, read = _run_asgi(limit, [b"x" * 2000], [(b"content-length", b"2000")])
    assert status == 413 and b"limit" in body and read == 0  # refused before reading a byte
    status, body, read = _run_asgi(limit, [b"x" * 600, b"x" * 600, b"x" * 600], [])  # chunked, no length
    assert status == 413 and read <= 1200
    assert _run_asgi(limit, [b""], [(b"content-length", b"lots")])[0] == 400


def _tables() -> tuple[pa.Table, pa.Table]:
    lesions = pa.table(
        {"lesion_id": ["L1", "L2", "L3"], "diagnosis": ["MEL", "NEV", None], **{a: [1.0, 2.0, None] for a in ATTRIBUTE_NAMES}}
    )
    return lesions, pa.table({"lesion_id": ["L2", "L3", "L1"], "predicted_area_mm2": [5.0, 9.0, 1.0]})


def _gallery(tmp_path) -> Gallery:
    ids = ["L3", "L1", "L2"]
    lesions, embeddings = _tables()
    write_thumbnails(str(tmp_path / "thumbs"), [(ids, [thumbnail_jpeg(encoded("JPEG", (64, 48)), 16), None, b"L2"])], 16)
    thumbnails = Thumbnails(str(tmp_path / "thumbs"), ids)
    return Gallery.build(ids, lesions, embeddings, ["area_mm2", "eccentricity"], thumbnails)


def test_gallery_rows_follow_the_index_order_and_shape_records(tmp_path) -> None:
    gallery = _gallery(tmp_path)
    assert gallery.ids == ["L3", "L1", "L2"] and gallery.predicted_names == ["area_mm2"]  # no predicted eccentricity column
    np.testing.assert_array_equal(gallery.predicted[:, 0], [9.0, 1.0, 5.0])
    record = gallery.record(gallery.row_of("L2"), score=0.91234567, inline_thumbnail=True)
    assert record["diagnosis"] == "NEV" and record["diagnosis_name"] == "Nevus"
    assert record["attributes"]["area_mm2"] == 2.0 and record["score"] == 0.912346
    assert record["thumbnail_url"] == "/lesions/L2/thumbnail" and record["thumbnail"] == "data:image/jpeg;base64,TDI="
    assert gallery.record(gallery.row_of("L1"), inline_thumbnail=True)["thumbnail"] is None  # a lesion without an image
    assert [r["thumbnail"] for r in gallery.records([(1, 0.5), (2, None)], inline_thumbnails=True)] == [
        None,
        "data:image/jpeg;base64,TDI=",
    ]
    bare = Gallery.build(gallery.ids, *_tables(), ["area_mm2"])  # no thumbnails written: no thumbnail URL to offer
    assert "thumbnail_url" not in bare.record(0) and bare.record(0, inline_thumbnail=True)["thumbnail"] is None
    unknown = gallery.record(gallery.row_of("L3"))
    assert unknown["diagnosis_name"] is None and unknown["attributes"]["area_mm2"] is None and "thumbnail" not in unknown
    thumb = Image.open(io.BytesIO(gallery.thumbnail(0)))
    assert max(thumb.size) == 16 and thumb.format == "JPEG"


def test_thumbnails_are_read_by_byte_range_through_a_bounded_cache(tmp_path) -> None:
    ids = [f"L{i}" for i in range(50)]
    jpegs = [thumbnail_jpeg(encoded("JPEG", (40 + i, 30)), 24) for i in range(50)]
    chunks = [(ids[s : s + 7], jpegs[s : s + 7]) for s in range(0, 50, 7)]  # chunks as the job streams them
    assert write_thumbnails(str(tmp_path / "t"), chunks, 24) == 50
    store = Thumbnails(str(tmp_path / "t"), ids, cache_rows=4)
    assert [store.get(r) for r in range(50)] == jpegs and store.info() == {"count": 50, "size": 24, "cached": 4}
    (tmp_path / "t" / "thumbnails.bin").write_bytes(b"")  # what is cached is served without a read
    assert store.get(49) == jpegs[49]
    fresh = Thumbnails(str(tmp_path / "t"), ids, cache_rows=8)
    (tmp_path / "t" / "thumbnails.bin").write_bytes(b"".join(jpegs))
    assert fresh.get_many([7, 3, 7, 40]) == [jpegs[7], jpegs[3], jpegs[7], jpegs[40]]  # one batched read, repeats kept
    assert fresh.info()["cached"] == 3
    with pytest.raises(ValueError, match="other lesions"):
        Thumbnails(str(tmp_path / "t"), ids[::-1])  # another order: every hit would show another lesion
    with pytest.raises(ValueError, match="other lesions"):
        Thumbnails(str(tmp_path / "t"), ids[:-1])
    with pytest.raises(ValueError, match="came with"):
        write_thumbnails(str(tmp_path / "u"), [(ids[:2], jpegs[:1])], 24)


def test_thumbnails_column_keeps_rows_without_an_image() -> None:
    batch = with_thumbnails(pa.table({"image_bytes": pa.array([encoded("PNG", (300, 150)), None], pa.binary())}), 64, "thumb")
    first, second = batch["thumb"].to_pylist()
    assert Image.open(io.BytesIO(first)).size == (64, 32) and second is None


def test_attribute_conditioned_neighbours_are_closest_predicted_values(tmp_path) -> None:
    gallery = _gallery(tmp_path)
    hits = gallery.nearest_by_value("area_mm2", 6.0, k=2)
    assert [gallery.ids[r] for r, _ in hits] == ["L2", "L3"] and [g for _, g in hits] == [1.0, 3.0]


def test_gallery_refuses_indexed_lesions_missing_from_the_tables() -> None:
    lesions = pa.table({"lesion_id": ["L1"], "diagnosis": ["MEL"]})
    embeddings = pa.table({"lesion_id": ["L1"]})
    with pytest.raises(ValueError, match="missing from the lesion or embeddings table"):
        Gallery.build(["L1", "L9"], lesions, embeddings, [])


def test_serve_config_section_has_safe_defaults_and_validates() -> None:
    cfg = load_config(None, ["serve.max_k=20", "serve.api_key_env=CLINIC_KEY"])
    assert cfg.serve.max_k == 20 and cfg.serve.api_key is None and cfg.serve.max_upload_bytes == 8 * MB
    with pytest.raises(ValueError):
        load_config(None, ["serve.max_k=1000"])
    with pytest.raises(ValueError):
        load_config(None, ["serve.max_adapters_per_replica=0"])


def test_serve_config_file_is_valid_and_names_the_app_deployments() -> None:
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    text = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(text)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(text)
    )
    [app] = schema.applications
    deployments = {d.name: d for d in app.deployments}
    assert deployments["Generation"].autoscaling_config["min_replicas"] == 0
    assert all(d.autoscaling_config["max_replicas"] >= d.autoscaling_config["min_replicas"] for d in deployments.values())
    assert schema.http_options.request_timeout_s > 0

    def bound(application) -> tuple[set[str], dict]:
        ingress = application._bound_deployment
        names = {ingress.name, *(a._bound_deployment.name for a in ingress.init_args if hasattr(a, "_bound_deployment"))}
        return names, ingress.init_args[-1]

    # The same builder `serve deploy` calls, with the file's args.
    names, config = bound(build_app(app.args))
    assert names == set(deployments)
    assert config["serve"]["max_adapters_per_replica"] == 4 and Path(config["serve"]["index"]).is_absolute()
    names, config = bound(build_app({**app.args, "serve.diffusion": "null"}))
    assert names == {"Ingress", "Retrieval"} and config["serve"]["diffusion"] is None


def test_attribute_search_by_binary_search_equals_a_full_sort() -> None:
    """Against the per-request argsort it replaces: ties (repeated values), values outside the range, unknown rows."""
    rng = np.random.default_rng(0)
    predicted = rng.integers(0, 30, 500).astype(float)  # many repeats: ties must go by row
    predicted[rng.choice(500, 20, replace=False)] = np.nan
    gallery = Gallery([f"L{i}" for i in range(500)], [None] * 500, np.zeros((500, 0)), ["area_mm2"], predicted[:, None], None)
    for value in (-5.0, 0.0, 7.5, 12.0, 29.0, 40.0):
        for k in (1, 5, 17, 490, 500):
            gap = np.abs(predicted - value)
            expected = np.argsort(gap, kind="stable")[:k]
            got = gallery.nearest_by_value("area_mm2", value, k)
            assert [r for r, _ in got] == expected.tolist()
            np.testing.assert_array_equal([g for _, g in got], gap[expected])
