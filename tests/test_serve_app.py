"""The Serve app on the real local Ray cluster, over real HTTP: retrieval, generation, the chain, hardening."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.serve_artifacts import GROUNDED, PER_DIAGNOSIS


@pytest.fixture(scope="module")
def client(served_app):
    with httpx.Client(base_url=served_app.url, headers=served_app.headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def gallery(served_app):
    return pq.read_table(served_app.root / "lesions", columns=["lesion_id", "diagnosis", "area_mm2", "image_bytes"]).to_pylist()


def upload(data: bytes, name: str = "lesion.jpg", mime: str = "image/jpeg") -> dict:
    return {"file": (name, data, mime)}


def png_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.format == "PNG"
    return image


def test_search_by_image_finds_the_same_lesion_first(client, gallery) -> None:
    lesion = gallery[5]
    response = client.post("/search", params={"k": 4, "thumbnails": True}, files=upload(lesion["image_bytes"]))
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert len(results) == 4 and results[0]["lesion_id"] == lesion["lesion_id"] and results[0]["score"] > 0.999
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["diagnosis"] == lesion["diagnosis"] and results[0]["attributes"]["area_mm2"] == pytest.approx(
        lesion["area_mm2"], rel=1e-3
    )
    thumbnail = Image.open(io.BytesIO(base64.b64decode(results[0]["thumbnail"].split(",", 1)[1])))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 96
    assert set(body["query"]["attributes"]) == set(GROUNDED)
    probabilities = body["query"]["diagnosis"]["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-3) and body["query"]["diagnosis"]["code"] in probabilities


def test_concurrent_searches_are_batched_and_each_gets_its_own_answer(client, gallery, served_app) -> None:
    import concurrent.futures

    def search(i: int) -> str:
        with httpx.Client(base_url=served_app.url, headers=served_app.headers, timeout=60) as c:
            return c.post("/search", params={"k": 1}, files=upload(gallery[i]["image_bytes"])).json()["results"][0]["lesion_id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        found = list(pool.map(search, range(8)))
    assert found == [gallery[i]["lesion_id"] for i in range(8)]


def test_attribute_conditioned_search_ranks_by_the_predicted_attribute(client, gallery) -> None:
    response = client.post("/search/attribute", params={"attribute": "area_mm2", "k": 5}, files=upload(gallery[2]["image_bytes"]))
    assert response.status_code == 200, response.text
    body = response.json()
    differences = [r["difference"] for r in body["results"]]
    assert body["attribute"] == "area_mm2" and len(differences) == 5 and differences == sorted(differences)
    assert differences[0] < 1e-3  # the upload is a gallery image: its own predicted value is in the gallery
    query_value = body["query"]["attributes"]["area_mm2"]
    assert all(abs(r["predicted_area_mm2"] - query_value) == pytest.approx(r["difference"], abs=1e-3) for r in body["results"])
    wrong = client.post("/search/attribute", params={"attribute": "patient_age", "k": 5}, files=upload(gallery[2]["image_bytes"]))
    assert wrong.status_code == 422 and "grounded attributes" in wrong.json()["detail"]


def test_search_by_note_text(client) -> None:
    response = client.post("/search/text", json={"text": "large asymmetric dark brown lesion with an irregular border", "k": 6})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 6 and len({r["lesion_id"] for r in results}) == 6
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert client.post("/search/text", json={"text": "   ", "k": 3}).status_code == 422


def test_predict_and_lesion_lookup(client, gallery) -> None:
    predicted = client.post("/predict", files=upload(gallery[0]["image_bytes"])).json()
    assert set(predicted["attributes"]) == set(GROUNDED) and all(v > 0 for v in predicted["attributes"].values())
    lesion_id = gallery[1]["lesion_id"]
    lesion = client.get(f"/lesions/{lesion_id}").json()
    assert lesion["lesion_id"] == lesion_id and lesion["diagnosis"] == gallery[1]["diagnosis"]
    thumbnail = client.get(f"/lesions/{lesion_id}/thumbnail")
    assert thumbnail.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"
    missing = client.get("/lesions/ISIC_9999999999")
    assert missing.status_code == 404 and "no lesion" in missing.json()["detail"]


def test_generation_uses_the_diagnosis_adapter_or_the_shared_one(client, served_app) -> None:
    first = client.post("/generate", json={"diagnosis": PER_DIAGNOSIS, "count": 2, "seed": 7})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["adapter"] == "per_diagnosis" and body["diagnosis"] == PER_DIAGNOSIS and "melanoma" in body["prompt"]
    images = [png_of(u) for u in body["images"]]
    assert len(images) == 2 and images[0].size == (32, 32)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 7 and 8
    again = client.post("/generate", json={"diagnosis": PER_DIAGNOSIS, "count": 1, "seed": 7}).json()
    # Seeded: the same image, up to a level of rounding (seed 7 alone vs in a batch of two: CPU kernels may differ).
    repeat = np.asarray(png_of(again["images"][0]), dtype=int) - np.asarray(images[0], dtype=int)
    assert np.abs(repeat).max() <= 2 < np.abs(np.asarray(images[1], dtype=int) - np.asarray(images[0], dtype=int)).max()

    shared = client.post("/generate", json={"diagnosis": "NEV", "count": 1, "seed": 7}).json()
    assert shared["adapter"] == "shared" and "nevus" in shared["prompt"]
    assert not np.array_equal(np.asarray(png_of(shared["images"][0])), np.asarray(images[0]))

    from ray import serve

    generation = serve.get_deployment_handle("Generation", app_name="dermaray")
    assert generation.loaded_adapters.remote().result() == ["shared"]  # bound of 1: MEL's adapter was evicted
    png = client.get(f"/generate/{PER_DIAGNOSIS}.png", params={"seed": 7})
    assert png.headers["content-type"] == "image/png" and png.headers["x-adapter"] == "per_diagnosis"
    reloaded = np.asarray(Image.open(io.BytesIO(png.content)), dtype=int) - np.asarray(images[0], dtype=int)
    assert np.abs(reloaded).max() <= 2  # the adapter reloaded: the same image, up to a level of rounding as above
    assert generation.loaded_adapters.remote().result() == [PER_DIAGNOSIS]


def test_generation_limits(client) -> None:
    assert client.post("/generate", json={"diagnosis": "MEL", "count": 4}).status_code == 422  # serve.max_images=3
    assert client.post("/generate", json={"diagnosis": "MEL", "count": 17}).status_code == 422
    unknown = client.post("/generate", json={"diagnosis": "XYZ", "count": 1})
    assert unknown.status_code == 422 and "'MEL'" in unknown.text  # the valid codes are listed
    assert client.post("/generate", json={"diagnosis": "MEL", "steps": 51}).status_code == 422


def test_chain_goes_from_upload_to_references_in_one_request(client, gallery) -> None:
    response = client.post("/chain", params={"k": 3, "count": 2, "seed": 1}, files=upload(gallery[4]["image_bytes"]))
    assert response.status_code == 200, response.text
    body = response.json()
    code = body["query"]["diagnosis"]["code"]
    assert body["diagnosis"] == {"code": code, "name": body["query"]["diagnosis"]["name"], "source": "classifier"}
    assert [r["lesion_id"] for r in body["similar"]][0] == gallery[4]["lesion_id"] and all(
        "thumbnail" in r for r in body["similar"]
    )
    assert body["generated"]["diagnosis"] == code and len(body["generated"]["images"]) == 2
    assert body["generated"]["adapter"] == ("per_diagnosis" if code == PER_DIAGNOSIS else "shared")
    # By default (serve.chain_guide) the references are drawn from the upload (img2img), so they resemble it;
    # `guide` picks the best-matching case's thumbnail instead, or the diagnosis alone.
    assert body["generated"]["guide"] == {"source": "upload"} and body["generated"]["strength"] == 0.6
    assert body["generated"]["ip_adapter_scale"] == 0.5  # the upload is the image prompt too (the base's IP-Adapter)
    images = {}
    for guide in ("none", "similar"):
        other = client.post(
            "/chain", params={"k": 3, "count": 2, "seed": 1, "guide": guide}, files=upload(gallery[4]["image_bytes"])
        )
        assert other.status_code == 200, other.text
        images[guide] = other.json()["generated"]["images"]
        expected = None if guide == "none" else {"source": "similar", "lesion_id": gallery[4]["lesion_id"]}
        assert other.json()["generated"]["guide"] == expected and other.json()["generated"]["strength"] == (expected and 0.6)
        assert other.json()["generated"]["ip_adapter_scale"] == (expected and 0.5)
    assert len({images["none"][0], images["similar"][0], body["generated"]["images"][0]}) == 3
    assert client.post("/chain", params={"guide": "sketch"}, files=upload(gallery[4]["image_bytes"])).status_code == 422
    one_step = client.post("/chain", params={"steps": 1}, files=upload(gallery[4]["image_bytes"]))  # 1 x 0.6: no step
    assert one_step.status_code == 422 and "denoise none: ask for 2+" in one_step.text
    # Checked before the search: an upload the search would refuse is not looked at.
    not_searched = client.post("/chain", params={"steps": 1}, files=upload(b"not an image"))
    assert not_searched.status_code == 422 and "denoise none" in not_searched.text


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def test_bad_uploads_and_limits_get_clear_4xx(client, gallery) -> None:
    not_image = client.post("/search", files=upload(b"lesion_id,diagnosis\nISIC_1,MEL\n", "notes.csv", "text/csv"))
    assert not_image.status_code == 415 and "not an image" in not_image.json()["detail"]
    bomb = client.post("/search", files=upload(_png_declaring(40000, 40000), "bomb.png", "image/png"))
    assert bomb.status_code == 422 and "pixels" in bomb.json()["detail"]
    too_big = client.post("/search", files=upload(b"\xff" * (2 * 1024 * 1024)))
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    # The replica's body limit (serve.max_upload_bytes + multipart overhead) answers before FastAPI parses a body.
    huge = client.post("/search/text", content=b" " * (2 * 1024 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "request body" in huge.json()["detail"]
    assert client.post("/search", params={"k": 21}, files=upload(gallery[0]["image_bytes"])).status_code == 422  # serve.max_k
    assert client.post("/search", params={"k": 0}, files=upload(gallery[0]["image_bytes"])).status_code == 422
    assert client.post("/search").status_code == 422  # no file


def test_api_key_is_required_when_configured(served_app, gallery) -> None:
    with httpx.Client(base_url=served_app.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/").status_code == 200  # page is public
        assert anonymous.get("/openapi.json").status_code == 200
        refused = anonymous.post("/search", files=upload(gallery[0]["image_bytes"]))
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["detail"]
        wrong = anonymous.get(f"/lesions/{gallery[0]['lesion_id']}", headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401


def test_openapi_documents_every_endpoint(client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/search", "/search/attribute", "/search/text", "/predict", "/lesions/{lesion_id}", "/generate", "/chain"} <= set(
        spec["paths"]
    )
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_schemathesis_finds_no_server_errors(served_app, tmp_path) -> None:
    """Property-based requests from the OpenAPI spec (examples, boundaries, fuzzing, stateful links):
    every answer must be below 500. The same command works against any running app."""
    served_app.schemathesis(tmp_path)


def test_note_text_and_attribute_values_stay_out_of_the_logs(client, gallery, ray_cluster) -> None:
    """Serve's access log records the requests, but never their note text or the values returned."""
    import time
    from pathlib import Path

    marker = "zebra-striped quokkaform nodule on the left shin"  # no digits: hex ids in Ray's logs could hold them
    assert client.post("/search/text", json={"text": marker, "k": 2}).status_code == 200
    assert client.post("/search/text", json={"text": marker * 200, "k": 2}).status_code == 413
    assert client.post("/search/text", json={"text": marker, "k": 0}).status_code == 422
    lesion = client.get(f"/lesions/{gallery[0]['lesion_id']}").json()
    value = f"{lesion['attributes']['perimeter_mm']}"
    logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())
    deadline = time.time() + 30
    while True:  # access lines reach the files asynchronously
        text = "\n".join(
            p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")
        )
        if text.count("/search/text") >= 3 or time.time() > deadline:
            break
        time.sleep(1)
    assert text.count("/search/text") >= 3, "the access log should record the three requests"
    assert "zebra-striped" not in text, "note text reached the logs"
    assert "quokkaform" not in text, "note text reached the logs"
    # Result payloads: in Serve's own logs (the session's other logs hold training metrics named after attributes).
    serve_text = "\n".join(p.read_text(errors="replace") for p in (logs / "serve").rglob("*") if p.is_file())
    assert "/search/text" in serve_text, "Serve's logs should be where the access lines are"
    assert "perimeter_mm" not in serve_text and value not in serve_text


def test_retriever_loads_every_artifact_from_s3(served_app, s3_options, gallery) -> None:
    """The same artifacts on object storage (moto's S3 server over HTTP): checkpoint, index, tables, classifier."""
    import s3fs

    from dermaray.config import load_config
    from dermaray.serving.retriever import Retriever

    fs = s3fs.S3FileSystem(**s3_options)
    folders = ("grounding", "index", "embeddings", "lesions", "thumbnails", "classifier", "image_projections")
    for name in folders:
        fs.put(str(served_app.root / name), f"dermaray/serve/{name}", recursive=True)
    local = load_config(None, served_app.overrides).serve
    settings = local.model_copy(
        update={
            name: f"s3://dermaray/serve/{folder}"
            for name, folder in (
                ("grounding_model", "grounding"),
                ("index", "index"),
                ("embeddings", "embeddings"),
                ("lesions", "lesions"),
                ("thumbnails", "thumbnails"),
                ("classifier", "classifier"),
                ("text_index", "image_projections"),
            )
        }
    )
    retriever = Retriever(settings, load_config(None, served_app.overrides).models, s3_options)
    found = retriever.search_image(gallery[7]["image_bytes"], k=3)
    assert found["results"][0]["lesion_id"] == gallery[7]["lesion_id"] and retriever.text_index is not None
    assert len(retriever.search_text("pink papule", k=2)["results"]) == 2
    thumbnail = Image.open(io.BytesIO(retriever.thumbnail(gallery[7]["lesion_id"])))  # a byte range read from S3
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 64  # the 64 px tile, not enlarged to 96


def test_retriever_refuses_an_index_another_model_made(served_app, tmp_path) -> None:
    """A grounding model retrained in place keeps its URI, not its weights: the old index is refused."""
    import shutil

    import torch

    from dermaray.config import load_config
    from dermaray.grounding.model import SETTINGS_FILE, WEIGHTS_FILE, save_model
    from dermaray.grounding.model import load_model as load_grounding
    from dermaray.serving.retriever import Retriever

    cfg = load_config(None, served_app.overrides)
    retrained = tmp_path / "grounding"
    shutil.copytree(served_app.root / "grounding", retrained)
    model, scaler, _ = load_grounding(retrained, cfg.models)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(0.01)  # one step of training, as it were
    save_model(retrained, model, scaler)
    assert (retrained / WEIGHTS_FILE).read_bytes() != (served_app.root / "grounding" / WEIGHTS_FILE).read_bytes()
    assert (retrained / SETTINGS_FILE).is_file()
    with pytest.raises(ValueError, match="re-run the embeddings job") as refused:
        Retriever(cfg.serve.model_copy(update={"grounding_model": str(retrained)}), cfg.models)
    assert str(served_app.root / "index") in str(refused.value)


def test_retrieval_in_the_ingress_answers_as_the_two_hop_app(served_app, client, gallery) -> None:
    """serve.retrieval_in_ingress: the ingress replica runs retrieval itself, no Retrieval deployment; same answers."""
    from ray import serve

    from dermaray.config import load_config
    from serve.app import app_from_config

    cfg = load_config(None, [*served_app.overrides, "serve.retrieval_in_ingress=true", "serve.diffusion=null"])
    serve.run(app_from_config(cfg), name="one-hop", route_prefix="/one-hop")
    try:
        deployments = serve.status().applications["one-hop"].deployments
        assert set(deployments) == {"Ingress"}
        lesion = gallery[5]
        found = []
        for prefix in ("", "/one-hop"):
            response = client.post(f"{prefix}/search", params={"k": 3}, files=upload(lesion["image_bytes"]))
            assert response.status_code == 200, response.text
            found.append(response.json())
        assert found[0] == found[1] and found[1]["results"][0]["lesion_id"] == lesion["lesion_id"]
        text = client.post("/one-hop/search/text", json={"text": "pink papule", "k": 2})
        assert text.status_code == 200 and len(text.json()["results"]) == 2
        assert client.get(f"/one-hop/lesions/{lesion['lesion_id']}/thumbnail").headers["content-type"] == "image/jpeg"
        assert client.get("/one-hop/lesions/ISIC_none").status_code == 404  # a RequestError raised in-process
        assert client.get("/one-hop/info").json()["lesions"] == len(gallery)
    finally:
        serve.delete("one-hop")
