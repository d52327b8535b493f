"""The Serve app as a cluster runs it: an API key or a refusal to start, /info without server paths,
and a deployment that cannot be scheduled answered with 503 and the reason at once (not 504 later).

The pure parts (key resolution, public locations, the schedulability verdict) run without Ray; the
rest uses the session's app (`served_app`, its key from a secret file) and starts two more small
apps on the same Serve instance, each deleted at the end of its test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from dermaray.config import load_config
from dermaray.serving.checks import resolve_api_key
from dermaray.serving.status import LOCAL, public_location, unschedulable_reason

# --- without Ray ----------------------------------------------------------------------------


def test_the_key_comes_from_the_env_var_then_the_file_then_the_config(tmp_path) -> None:
    secret = tmp_path / "api-key"
    secret.write_text("from-file\n")
    s = load_config(None, [f"serve.api_key_file={secret}", "serve.api_key=in-yaml"]).serve
    assert resolve_api_key(s, {"DERMARAY_API_KEY": "from-env"}) == ("from-env", [])
    assert resolve_api_key(s, {}) == ("from-file", [])
    key, warnings = resolve_api_key(load_config(None, ["serve.api_key=in-yaml"]).serve, {})
    assert key == "in-yaml" and "DERMARAY_API_KEY" in warnings[0] and "api_key_file" in warnings[0]


def test_no_key_refuses_unless_anonymous_is_allowed(tmp_path) -> None:
    with pytest.raises(ValueError, match="no API key: set the DERMARAY_API_KEY .* serve.api_key_file"):
        resolve_api_key(load_config(None).serve, {})
    key, warnings = resolve_api_key(load_config(None, ["serve.allow_anonymous=true"]).serve, {})
    assert key is None and "without an API key" in warnings[0]
    assert load_config(Path(__file__).parents[1] / "configs" / "local.yaml").serve.allow_anonymous
    assert not load_config(Path(__file__).parents[1] / "configs" / "cluster.yaml").serve.allow_anonymous
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_api_key(load_config(None, [f"serve.api_key_file={tmp_path / 'missing'}"]).serve, {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(load_config(None, [f"serve.api_key_file={tmp_path / 'empty'}"]).serve, {})


def test_public_locations_hide_server_paths_and_credentials() -> None:
    assert public_location("/srv/dermaray/index") == public_location("out/index") == public_location("file:///x") == LOCAL
    assert public_location("s3://bucket/dermaray/index") == "s3://bucket/dermaray/index"
    assert public_location("s3://KEY:SECRET@bucket/p?sig=abc") == "s3://bucket/p"
    assert public_location(None) is None


def _deployment(*replicas: dict, required: dict | None = None) -> dict:
    return {"name": "Generation", "required_resources": required or {"CPU": 1.0}, "replicas": list(replicas)}


def test_unschedulable_only_when_nothing_runs_or_is_placed_and_no_node_has_room() -> None:
    pending = {"state": "STARTING", "node_id": None}
    assert unschedulable_reason(_deployment(), [{"CPU": 0.0}]) is None  # no replica asked for yet (scale from zero)
    assert unschedulable_reason(_deployment(pending), [{"CPU": 1.0}]) is None  # room: about to be placed
    assert unschedulable_reason(_deployment(pending, {"state": "RUNNING", "node_id": "n"}), [{"CPU": 0.0}]) is None
    assert unschedulable_reason(_deployment({"state": "STARTING", "node_id": "n"}), [{"CPU": 0.0}]) is None  # loading
    reason = unschedulable_reason(_deployment(pending), [{"CPU": 0.75}, {"CPU": 0.5}])
    assert "Generation cannot be scheduled" in reason and "CPU=1" in reason and "CPU=0.75" in reason
    # Room summed over nodes is not room on one node.
    assert unschedulable_reason(_deployment(pending, required={"CPU": 1.0, "GPU": 1.0}), [{"CPU": 4.0}, {"GPU": 1.0}])


# --- on the session's Ray cluster -------------------------------------------------------------


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_info_shows_no_server_path(served_app) -> None:
    with httpx.Client(base_url=served_app.url, timeout=60) as client:
        assert client.get("/info").status_code == 401  # the key from serve.api_key_file is required
        response = client.get("/info", headers=served_app.headers)
    assert response.status_code == 200, response.text
    info = response.json()
    strings = _strings(info)
    assert not [s for s in strings if s.startswith("/") or str(served_app.root) in s or "/tmp" in s], json.dumps(info)[:2000]
    assert info["artifacts"]["index"] == LOCAL and info["models"]["grounding_mllm"] == "tiny"
    assert info["lesions"] == 24 and info["index"]["count"] == 24 and info["api_key_required"] is True
    assert info["generation"]["deployed"] is True and info["generation"]["status"] in {"HEALTHY", "UPSCALING", "DOWNSCALING"}
    assert load_config(None, served_app.overrides).serve.api_key is None  # the session's key came from a file


def _small_app(served_app, name: str, extra: list[str], options: dict):
    """Another app over the session's artifacts, on its own route prefix (deleted by the caller)."""
    from ray import serve

    from serve.app import app_from_config

    overrides = [o for o in served_app.overrides if not o.startswith("serve.api_key")] + extra
    serve.run(app_from_config(load_config(None, overrides), options=options), name=name, route_prefix=f"/{name}")


def test_the_app_refuses_to_start_without_a_key(served_app, monkeypatch) -> None:
    from ray import serve

    monkeypatch.delenv("DERMARAY_API_KEY", raising=False)
    try:
        with pytest.raises(Exception, match="Deploying application nokey failed"):
            _small_app(
                served_app,
                "nokey",
                ["serve.diffusion=null", "serve.classifier=null"],
                {"Retrieval": {"ray_actor_options": {"num_cpus": 0.05}}, "Ingress": {"ray_actor_options": {"num_cpus": 0.05}}},
            )
        ingress = serve.status().applications["nokey"].deployments["Ingress"]
        assert ingress.status == "DEPLOY_FAILED" and "refuses to start: no API key" in ingress.message, ingress.message[-2000:]
        assert "DERMARAY_API_KEY" in ingress.message and "serve.api_key_file" in ingress.message
    finally:
        serve.delete("nokey")


def test_an_unschedulable_generation_answers_503_with_the_reason_at_once(served_app) -> None:
    """Defect 7b: on a 2-CPU head, a Generation replica that needs more CPU than is free made /chain wait for
    the 120 s timeout and answer 504. Here it asks for 2 CPUs on the session's 2-CPU cluster, where the
    session's app holds some: never placeable."""
    from ray import serve

    small = {"ray_actor_options": {"num_cpus": 0.05}}
    unschedulable = {
        "ray_actor_options": {"num_cpus": 2},
        "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1},
    }
    try:
        _small_app(
            served_app,
            "tight",
            ["serve.allow_anonymous=true", "serve.generation_timeout_s=120"],
            {"Retrieval": small, "Ingress": small, "Generation": unschedulable},
        )
        with httpx.Client(base_url=f"{served_app.url}/tight", timeout=150) as client:
            started = time.perf_counter()
            response = client.post("/generate", json={"diagnosis": "MEL", "count": 1})
            first = time.perf_counter() - started
            assert response.status_code == 503, response.text
            detail = response.json()["detail"]
            assert "Generation cannot be scheduled" in detail and "CPU=2" in detail and "ray_actor_options" in detail
            assert first < 15, f"503 after {first:.1f} s: the point is not to wait for the 120 s timeout"
            print(f"first 503 after {first:.1f} s")

            image = (served_app.root / "lesions").glob("*.parquet").__next__()
            import pyarrow.parquet as pq

            jpeg = pq.read_table(image, columns=["image_bytes"])["image_bytes"][0].as_py()
            started = time.perf_counter()
            chain = client.post("/chain", params={"k": 2, "count": 1}, files={"file": ("l.jpg", jpeg, "image/jpeg")})
            assert chain.status_code == 503 and "cannot be scheduled" in chain.json()["detail"], chain.text
            assert time.perf_counter() - started < 15  # the replica is already known to be stuck
            print(f"/chain 503 after {time.perf_counter() - started:.1f} s")
            assert client.get("/info").json()["generation"]["running_replicas"] == 0
    finally:
        serve.delete("tight")


def test_generation_with_a_base_of_its_own_reads_only_the_adapters(served_app, s3_options, ray_cluster) -> None:
    """A hub base (any non-tiny models.diffusion_base) is resolved on the replica's node; serve.diffusion on
    object storage then holds only adapter/ and adapters/<code>, and nothing else is downloaded. Here the
    base is a local folder, which resolve_model returns as is (the hub fetch itself: tests/test_model_hub.py).
    The Generation class runs in a Ray actor, as in its replica, without Serve around it."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    local = served_app.root / "diffusion"
    for part in ("adapter", "adapters"):  # no base/ on the store
        fs.put(str(local / part), f"dermaray/served-adapters/{part}", recursive=True)
    fs.pipe("dermaray/served-adapters/runs/checkpoint/huge.bin", b"0" * 1024)  # training runs: never fetched
    cfg = load_config(
        None,
        [o for o in served_app.overrides if not o.startswith("serve.diffusion")]
        + ["serve.diffusion=s3://dermaray/served-adapters", f"models.diffusion_base={local / 'base'}"],
    )
    cfg.storage_options = s3_options

    @ray_cluster.remote(num_cpus=0)
    class Replica:
        def __init__(self, config: dict):
            from serve.app import generation_class

            self.generation = generation_class(1)(config)

        def fetched(self) -> list[str]:
            root = Path(self.generation._folder.name)
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

        def generate(self, code: str) -> tuple[bytes, dict]:
            pngs, info = self.generation.bank.generate(code, 1, 0, 2, 7.5)
            return pngs[0], info

    replica = Replica.remote(cfg.model_dump(mode="json"))
    try:
        fetched = ray_cluster.get(replica.fetched.remote(), timeout=120)
        assert fetched and all(p.startswith(("adapter/", "adapters/")) for p in fetched), fetched
        png, info = ray_cluster.get(replica.generate.remote("MEL"), timeout=120)
        assert info["adapter"] == "per_diagnosis" and png.startswith(b"\x89PNG")
        assert ray_cluster.get(replica.generate.remote("NEV"), timeout=120)[1]["adapter"] == "shared"
    finally:
        ray_cluster.kill(replica)


def test_a_timed_out_generation_answers_504_and_its_work_stops(served_app) -> None:
    """A generation slower than serve.generation_timeout_s: the client gets 504, and the replica's denoising
    loop ends at its next step instead of running on for nobody (the flag set when the call is cancelled)."""
    from ray import serve

    small = {"ray_actor_options": {"num_cpus": 0.05}}
    warm = {**small, "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1}}
    try:
        _small_app(
            served_app,
            "slow",
            ["serve.allow_anonymous=true", "serve.generation_timeout_s=3", "serve.max_steps=500", "serve.max_images=4"],
            {"Retrieval": small, "Ingress": small, "Generation": warm},
        )
        generation = serve.get_deployment_handle("Generation", app_name="slow")
        with httpx.Client(base_url=f"{served_app.url}/slow", timeout=60) as client:
            client.post("/generate", json={"diagnosis": "MEL", "count": 1, "steps": 1})  # loads the adapter
            started = time.perf_counter()
            response = client.post("/generate", json={"diagnosis": "MEL", "count": 4, "steps": 500})
            took = time.perf_counter() - started
        assert response.status_code == 504 and "longer than 3 s" in response.json()["detail"], response.text
        assert took < 10, f"504 after {took:.1f} s"
        answered = time.perf_counter()
        while (work := generation.generations.remote().result()) != {"running": 0, "stopped": 1}:
            assert time.perf_counter() - answered < 15, f"the generation is still running 15 s after its 504: {work}"
            time.sleep(0.2)
        print(f"504 after {took:.1f} s; the generation stopped within {time.perf_counter() - answered:.1f} s of it")
    finally:
        serve.delete("slow")
