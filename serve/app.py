"""Ray Serve: retrieval and generation deployments behind one FastAPI ingress with a web page.

    serve run serve.app:build_app config=configs/local.yaml          # local, http://127.0.0.1:8000
    serve deploy serve/config.yaml                                   # a running cluster, autoscaled

Deployments:
- Retrieval: grounded encoder + vector index + gallery (dermaray.serving.retriever); image
  searches from concurrent requests are batched into one forward pass (`serve.batch`).
- Generation: one diffusion pipeline per replica; per-diagnosis LoRA adapters swapped on it,
  at most `serve.max_adapters_per_replica` loaded (`serve.multiplexed`, keyed by diagnosis code,
  so requests for a diagnosis go to a replica that already holds its adapter).
- Ingress: the HTTP API (OpenAPI at /docs) and the clinician page at /; it enforces the body
  limit and the API key, times out calls to the other two, and answers 503 at once when one cannot be scheduled.

`build_app(args)` takes `config` (a dermaray YAML config) and `key=value` overrides, e.g.
`serve.max_k=20`; everything served is read from the `serve` section of that config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Query, Request, Security, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from dermaray.config import DermarayConfig, load_config
from dermaray.diffusion import denoising_steps
from dermaray.diffusion.pipeline import GenerationStopped
from dermaray.layout import DIFFUSION_BASE, PER_DIAGNOSIS_ADAPTERS, SHARED_ADAPTER
from dermaray.schema import DIAGNOSES_BY_CODE
from dermaray.serving.chain import chain_diagnosis, chain_guide
from dermaray.serving.checks import (
    MULTIPART_OVERHEAD,
    BodyLimit,
    RequestError,
    check_api_key,
    check_count,
    check_k,
    check_upload_size,
    decode_upload,
    resolve_api_key,
)
from dermaray.serving.status import public_location, public_model, unschedulable_reason
from dermaray.storage import is_remote

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
HARD_MAX_K = 100  # the OpenAPI bound; the configured serve.max_k (<= 100) is enforced at run time
HARD_MAX_IMAGES = 16
SEARCH_BATCH = 16  # image searches per forward pass
# A call not answered within SCHEDULE_POLL_S makes the ingress ask Serve whether the deployment can run at
# all; "it cannot" seen for UNSCHEDULABLE_CONFIRM_S (a replica being placed is briefly unplaced) is a 503.
SCHEDULE_POLL_S = 0.5
UNSCHEDULABLE_CONFIRM_S = 1.0
CALL_RETRIES = 1  # a call whose replica died is sent once more (Ingress._call)
# The serve.* settings that locate what the replicas load.
ARTIFACTS = ("grounding_model", "index", "embeddings", "lesions", "thumbnails", "classifier", "text_index", "diffusion")


# --- Retrieval ----------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _match_torch_threads_to_cpus() -> None:
    """One torch thread per CPU the replica was given (at least one). Ray sets no thread count for
    fractional CPUs, and torch's default (every core) makes small models several times slower on a
    busy node: threads spin-wait for cores other replicas hold."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


@serve.deployment(name="Retrieval", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Retrieval:
    def __init__(self, config: dict):
        from dermaray.serving.retriever import Retriever

        cfg = DermarayConfig.model_validate(config)
        _match_torch_threads_to_cpus()
        self.core = Retriever(cfg.serve, cfg.models, cfg.storage_options)

    # Answers leave the replica as JSON bytes, encoded in the worker thread: the ingress passes
    # them through, so a result is neither pickled as nested objects nor re-encoded by FastAPI.

    async def search_image(self, upload: bytes, k: int, thumbnails: bool) -> bytes:
        result = await self._search_batch(upload, k, thumbnails)
        if isinstance(result, RequestError):
            raise result
        return result

    # No wait for a batch to fill: while one batch runs in its thread, the next requests queue
    # and form the next batch, so batches grow with load and a lone request never waits.
    @serve.batch(max_batch_size=SEARCH_BATCH, batch_wait_timeout_s=0.0)
    async def _search_batch(self, uploads: list[bytes], ks: list[int], thumbnails: list[bool]) -> list[Any]:
        # In a thread, so the replica keeps taking requests (the next batch) while the model runs.
        def run() -> list[Any]:
            return [r if isinstance(r, RequestError) else _json(r) for r in self.core.search_batch(uploads, ks, thumbnails)]

        return await asyncio.to_thread(run)

    async def search_attribute(self, upload: bytes, attribute: str, k: int, thumbnails: bool) -> bytes:
        return await asyncio.to_thread(lambda: _json(self.core.search_attribute(upload, attribute, k, thumbnails)))

    async def search_text(self, text: str, k: int, thumbnails: bool) -> bytes:
        return await asyncio.to_thread(lambda: _json(self.core.search_text(text, k, thumbnails)))

    async def predict(self, upload: bytes) -> bytes:
        return await asyncio.to_thread(lambda: _json(self.core.predict(upload)))

    def lesion(self, lesion_id: str, thumbnails: bool) -> bytes:
        return _json(self.core.lesion(lesion_id, thumbnails))

    def thumbnail(self, lesion_id: str) -> bytes:
        return self.core.thumbnail(lesion_id)

    def info(self) -> dict[str, Any]:
        return self.core.info()


class InProcess:
    """A deployment class's instance inside this replica, called the way its handle is: `target.method.remote(*args)`
    gives an awaitable. With `serve.retrieval_in_ingress` the ingress holds Retrieval so: one hop per search."""

    class Method:
        def __init__(self, method: Any):
            self.method = method

        def remote(self, *args: Any) -> asyncio.Future:
            if asyncio.iscoroutinefunction(self.method):
                return asyncio.ensure_future(self.method(*args))
            return asyncio.ensure_future(asyncio.to_thread(self.method, *args))  # a sync method: off the event loop

    def __init__(self, instance: Any, deployment_name: str):
        self._instance, self.deployment_name = instance, deployment_name

    def __getattr__(self, name: str) -> InProcess.Method:
        return InProcess.Method(getattr(self._instance, name))


# --- Generation ---------------------------------------------------------------------------


class LoadedAdapter:
    """What the multiplexer caches per diagnosis; Serve calls __del__ when it evicts it."""

    def __init__(self, bank: Any, code: str):
        self.bank, self.code, self.released = bank, code, False
        bank.load(code)

    def __del__(self) -> None:
        if not self.released:  # Serve calls it on eviction, Python again at garbage collection
            self.released = True
            self.bank.release(self.code)


def generation_class(max_adapters: int) -> type:
    """The Generation deployment class; the adapter bound is fixed when `serve.multiplexed` decorates."""

    class Generation:
        def __init__(self, config: dict):
            from dermaray.models.registry import resolve_model
            from dermaray.serving.adapters import AdapterBank
            from dermaray.storage import download_folder, join, present

            cfg = DermarayConfig.model_validate(config)
            _match_torch_threads_to_cpus()
            self.settings, self.bank = cfg.serve, None
            self.lock, self.work = threading.Lock(), {"running": 0, "stopped": 0}
            root, options = cfg.serve.diffusion, cfg.storage_options
            # The tiny base is pre-trained by the diffusion job into <diffusion>/base; a hub base is
            # fetched on this node like every model, and <diffusion> holds only its adapters.
            trained_base = cfg.models.diffusion_base == "tiny"
            if trained_base and not present(root, f"{DIFFUSION_BASE}/model_index.json", options):
                # Answer 503 with the reason rather than crash-loop (the diffusion job has not run).
                log.warning("serve.diffusion holds no base pipeline: generation answers 503")
                return
            base = None if trained_base else resolve_model("diffusion_base", cfg.models.diffusion_base, cfg.models)
            local = root.removeprefix("file://")
            if is_remote(root):  # only what generation reads, not the training runs beside it
                self._folder = tempfile.TemporaryDirectory(prefix="diffusion-")
                local = self._folder.name
                for part in ([DIFFUSION_BASE] if trained_base else []) + [SHARED_ADAPTER, PER_DIAGNOSIS_ADAPTERS]:
                    if part == DIFFUSION_BASE or present(root, part, options):
                        download_folder(join(root, part), os.path.join(local, part), options)
            self.bank = AdapterBank(local, resolution=cfg.serve.resolution or cfg.diffusion.resolution, base=base)
            if cfg.serve.guide_ip_adapter_scale is not None and self.bank.ip_adapter is None:
                log.warning(
                    "serve.guide_ip_adapter_scale is set but the base has no IP-Adapter: guided references use img2img only"
                )

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, code: str) -> LoadedAdapter:  # only called with a bank
            return await asyncio.to_thread(LoadedAdapter, self.bank, code)

        async def generate(self, code: str, count: int, seed: int, steps: int, guide: bytes | None = None) -> dict[str, Any]:
            if self.bank is None:
                raise RequestError(
                    503,
                    "generation is unavailable: serve.diffusion holds no diffusion pipeline "
                    "(run the diffusion job, or set serve.diffusion)",
                )
            await self.adapter(code)  # the request's multiplexed model id is `code` (set by the ingress)
            # Cancelling this coroutine (the ingress' timeout, a client gone) cannot stop its thread: the
            # flag does, at the next denoising step, so no replica keeps computing an answer nobody awaits.
            stop = threading.Event()
            s = self.settings
            image = None if guide is None else decode_upload(guide, s.max_upload_bytes, s.max_image_pixels)

            def run() -> tuple[list[bytes], dict[str, Any]]:
                with self.lock:
                    self.work["running"] += 1
                try:
                    return self.bank.generate(
                        code,
                        count,
                        seed,
                        steps,
                        s.guidance_scale,
                        stop.is_set,
                        guide=image,
                        strength=s.guide_strength,
                        ip_adapter_scale=s.guide_ip_adapter_scale,
                    )
                except GenerationStopped:
                    with self.lock:
                        self.work["stopped"] += 1
                    raise
                finally:
                    with self.lock:
                        self.work["running"] -= 1

            try:
                pngs, info = await asyncio.to_thread(run)
            except asyncio.CancelledError:
                stop.set()
                raise
            return {**info, "pngs": pngs}

        def loaded_adapters(self) -> list[str]:
            return self.bank.loaded if self.bank else []

        def generations(self) -> dict[str, int]:
            """Generations running in this replica's threads now, and those stopped because their call was cancelled."""
            with self.lock:
                return dict(self.work)

    return Generation


# --- Ingress ------------------------------------------------------------------------------


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=20000, description="note text; never logged")
    k: int = Field(default=10, ge=1, le=HARD_MAX_K)
    thumbnails: bool = False


DiagnosisCode = Literal[tuple(DIAGNOSES_BY_CODE)]  # documented as an enum in the OpenAPI spec


class GenerateRequest(BaseModel):
    diagnosis: DiagnosisCode = Field(description="diagnosis code", examples=["MEL"])
    count: int = Field(default=2, ge=1, le=HARD_MAX_IMAGES)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    steps: int | None = Field(default=None, ge=1, le=1000)


api = FastAPI(
    title="dermaray",
    version="0.1.0",
    description="Skin-lesion retrieval (by image, attribute, note text), diagnosis prediction and "
    "diagnosis-to-image generation. Send `X-API-Key` when the service has a key configured.",
)
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has a key")


class JSONBytes(Response):
    """A JSON body the Retrieval replica already encoded."""

    media_type = "application/json"


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


def _data_url(png: bytes) -> str:
    from dermaray.serving.gallery import data_url

    return data_url(png, "image/png")


def _plain(value: Any) -> Any:
    """Serve's details as plain JSON values (its enums are str subclasses). Defined above Ingress: `serve.ingress`
    serialises the class as it decorates it, with the module globals defined so far."""
    return json.loads(json.dumps(value, default=str))


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, retrieval: DeploymentHandle | None, generation: DeploymentHandle | None, config: dict):
        """`retrieval` None: this replica runs retrieval itself (`serve.retrieval_in_ingress`)."""
        cfg = DermarayConfig.model_validate(config)
        self.settings = s = cfg.serve
        if retrieval is None:
            retrieval = InProcess(Retrieval.func_or_class(config), serve.get_replica_context().deployment)
        self.retrieval, self.generation = retrieval, generation
        try:  # here, in the replica: the env var and the secret file are this node's
            self.api_key, warnings = resolve_api_key(s, os.environ)
        except ValueError as exc:
            raise RuntimeError(f"the dermaray app refuses to start: {exc}") from None
        for warning in warnings:
            log.warning(warning)
        self.public = {  # what /info says of the configuration: names and remote URIs, never this server's paths
            "models": {
                role: public_model(getattr(cfg.models, role)) for role in ("grounding_mllm", "text_encoder", "diffusion_base")
            },
            "artifacts": {name: public_location(getattr(s, name)) for name in ARTIFACTS},
        }
        self._state: tuple[float, asyncio.Future] | None = None  # the last look at Serve's state, shared by waiting calls
        self._app = serve.get_replica_context().app_name
        self.default_steps = min(s.steps, s.max_steps)
        self.page = PAGE.read_text()

    def __serve_build_asgi_app__(self) -> Any:
        """Serve's hook, called once per replica after __init__: the app this replica serves (Serve's frozen copy
        of `api`), with the body limit of this replica's config in front of every route."""
        self.app.add_middleware(BodyLimit, max_bytes=self.settings.max_upload_bytes + MULTIPART_OVERHEAD)
        return self.app

    # -- plumbing --

    async def _call(self, method: Any, *args: Any, timeout: float, deployment: str | None = None) -> Any:
        """`method.remote(*args)`, a deployment handle's method: its result; 504 past `timeout`, or 503 with the
        reason as soon as the deployment is seen unable to run (no replica running or placed, no node with room).

        A call whose replica died under it (killed, out of memory, its node lost) is sent once more within the
        same deadline, and Serve routes it to a live replica: every call here is a read or a seeded generation,
        so repeating one is safe, and a client sees a replica's death only if the second try fails too.
        `deployment`: the name of the deployment `method` belongs to (default: Retrieval's)."""
        deployment = deployment or self.retrieval.deployment_name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(1 + CALL_RETRIES):
            try:
                return await self._await(method.remote(*args), deadline, timeout, deployment)
            except RayActorError as exc:
                if attempt == CALL_RETRIES or loop.time() >= deadline:
                    raise RequestError(503, f"the {deployment} replica serving this request stopped; try again") from exc
                log.warning("%s replica stopped during a call (%s); sending it again", deployment, type(exc).__name__)

    async def _await(self, response: Any, deadline: float, timeout: float, deployment: str) -> Any:
        async def result() -> Any:
            return await response

        task = asyncio.ensure_future(result())
        loop = asyncio.get_running_loop()
        unschedulable_since = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, min(SCHEDULE_POLL_S, deadline - loop.time())))
                if done:
                    return task.result()
                if loop.time() >= deadline:
                    raise RequestError(504, f"the request took longer than {timeout:g} s")
                reason = await self._unschedulable(deployment)
                if reason is None:
                    unschedulable_since = None
                elif unschedulable_since is None:
                    unschedulable_since = loop.time()
                elif loop.time() - unschedulable_since >= UNSCHEDULABLE_CONFIRM_S:
                    raise RequestError(503, reason)
        except RayTaskError as exc:
            if isinstance(exc.cause, RequestError):
                raise exc.cause from None
            raise
        finally:
            if not task.done():
                response.cancel()
                task.cancel()

    async def _serve_state(self) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """(this app's deployment details, free resources per alive node), at most SCHEDULE_POLL_S old."""
        loop = asyncio.get_running_loop()
        if self._state is None or loop.time() - self._state[0] > SCHEDULE_POLL_S:

            def fetch() -> tuple[dict[str, Any], list[dict[str, float]]]:
                import ray
                from ray._private.state import available_resources_per_node
                from ray.serve.context import _get_global_client

                details = _get_global_client().get_serve_details()  # what `serve.status()` reads, with replica placement
                deployments = details.get("applications", {}).get(self._app, {}).get("deployments", {})
                free = list(available_resources_per_node().values()) or [ray.available_resources()]
                return {name: dict(d) for name, d in deployments.items()}, free

            self._state = (loop.time(), asyncio.ensure_future(asyncio.to_thread(fetch)))
        return await self._state[1]

    async def _unschedulable(self, deployment: str) -> str | None:
        try:
            deployments, free = await self._serve_state()
        except Exception as exc:  # Serve's state unreadable: no verdict, the call keeps its timeout
            log.warning("could not read Serve's state (%r): no early 503 for unschedulable deployments", exc)
            self._state = None
            return None
        details = deployments.get(deployment)
        return unschedulable_reason(_plain(details), free) if details else None

    async def _read(self, file: UploadFile) -> bytes:
        data = await file.read(self.settings.max_upload_bytes + 1)
        check_upload_size(len(data), self.settings.max_upload_bytes)
        return data

    async def _generate(self, code: str, count: int, seed: int, steps: int | None, guide: bytes | None = None) -> dict[str, Any]:
        if self.generation is None:
            raise RequestError(503, "generation is not deployed (serve.diffusion is null)")
        check_count(count, self.settings.max_images)
        steps = self._steps(steps, guided=guide is not None)
        handle = self.generation.options(multiplexed_model_id=code)
        return await self._call(
            handle.generate,
            code,
            count,
            seed,
            steps,
            guide,
            timeout=self.settings.generation_timeout_s,
            deployment=self.generation.deployment_name,
        )

    def _steps(self, steps: int | None, guided: bool) -> int:
        """The steps a generation runs (the default where none are asked for), or a 422 that says why not."""
        steps = steps or self.default_steps
        if steps > self.settings.max_steps:
            raise RequestError(422, f"steps must be between 1 and {self.settings.max_steps}, got {steps}")
        if guided and denoising_steps(steps, self.settings.guide_strength) < 1:
            least = math.ceil(1 / self.settings.guide_strength)
            raise RequestError(
                422, f"{steps} steps at guide strength {self.settings.guide_strength} denoise none: ask for {least}+"
            )
        return steps

    # -- page and metadata --

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz", summary="Liveness")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info", summary="Gallery size, index, grounded attributes, diagnoses, limits, what is configured and running")
    async def info(self, api_key: str | None = Security(api_key_header)) -> dict[str, Any]:
        check_api_key(self.api_key, api_key)
        info = await self._call(self.retrieval.info, timeout=self.settings.call_timeout_s)
        s = self.settings
        generation: dict[str, Any] = {"deployed": self.generation is not None}
        if self.generation is not None:  # its state from Serve: asking the replica would wake one scaled to zero
            try:
                deployments, _ = await self._serve_state()
                details = _plain(deployments.get(self.generation.deployment_name) or {})
                generation.update(
                    status=details.get("status"),
                    running_replicas=sum(r.get("state") == "RUNNING" for r in details.get("replicas") or []),
                )
            except Exception as exc:  # Serve's state unreadable: /info without it
                log.warning("could not read Serve's state: %r", exc)
                self._state = None
        return {
            **info,
            **self.public,
            "generation": generation,
            "max_images": s.max_images,
            "max_upload_bytes": s.max_upload_bytes,
            "api_key_required": bool(self.api_key),
        }

    # -- retrieval --

    @api.post("/search", summary="Similar lesions to an uploaded image (grounded embedding, vector index)")
    async def search(
        self,
        file: UploadFile = File(..., description="JPEG, PNG or WebP"),
        k: int = Query(10, ge=1, le=HARD_MAX_K),
        thumbnails: bool = Query(False, description="inline JPEG data URLs"),
        api_key: str | None = Security(api_key_header),
    ) -> Response:
        check_api_key(self.api_key, api_key)
        upload = await self._read(file)
        k = check_k(k, self.settings.max_k)
        return JSONBytes(
            await self._call(self.retrieval.search_image, upload, k, thumbnails, timeout=self.settings.call_timeout_s)
        )

    @api.post("/search/attribute", summary="Lesions whose predicted attribute is closest to the upload's")
    async def search_attribute(
        self,
        file: UploadFile = File(...),
        attribute: str = Query(..., examples=["area_mm2"]),
        k: int = Query(10, ge=1, le=HARD_MAX_K),
        thumbnails: bool = Query(False),
        api_key: str | None = Security(api_key_header),
    ) -> Response:
        check_api_key(self.api_key, api_key)
        upload = await self._read(file)
        k = check_k(k, self.settings.max_k)
        return JSONBytes(
            await self._call(
                self.retrieval.search_attribute, upload, attribute, k, thumbnails, timeout=self.settings.call_timeout_s
            )
        )

    @api.post("/search/text", summary="Lesions matching a clinical note (classifier's shared image-text space)")
    async def search_text(self, query: TextQuery, api_key: str | None = Security(api_key_header)) -> Response:
        check_api_key(self.api_key, api_key)
        k = check_k(query.k, self.settings.max_k)
        return JSONBytes(
            await self._call(self.retrieval.search_text, query.text, k, query.thumbnails, timeout=self.settings.call_timeout_s)
        )

    @api.post("/predict", summary="Predicted attributes (grounded heads) and diagnosis (classifier) of an image")
    async def predict(self, file: UploadFile = File(...), api_key: str | None = Security(api_key_header)) -> Response:
        check_api_key(self.api_key, api_key)
        return JSONBytes(await self._call(self.retrieval.predict, await self._read(file), timeout=self.settings.call_timeout_s))

    @api.get("/lesions/{lesion_id}", summary="One gallery lesion: diagnosis and attributes")
    async def lesion(
        self, lesion_id: str, thumbnails: bool = Query(False), api_key: str | None = Security(api_key_header)
    ) -> Response:
        check_api_key(self.api_key, api_key)
        return JSONBytes(await self._call(self.retrieval.lesion, lesion_id, thumbnails, timeout=self.settings.call_timeout_s))

    @api.get(
        "/lesions/{lesion_id}/thumbnail",
        summary="A gallery lesion's thumbnail (JPEG)",
        responses={200: {"content": {"image/jpeg": {}}}},
        response_class=Response,
    )
    async def thumbnail(self, lesion_id: str, api_key: str | None = Security(api_key_header)) -> Response:
        check_api_key(self.api_key, api_key)
        data = await self._call(self.retrieval.thumbnail, lesion_id, timeout=self.settings.call_timeout_s)
        return Response(data, media_type="image/jpeg")

    # -- generation --

    @api.post("/generate", summary="Reference images of a diagnosis (PNG data URLs)")
    async def generate(self, request: GenerateRequest, api_key: str | None = Security(api_key_header)) -> dict[str, Any]:
        check_api_key(self.api_key, api_key)
        out = await self._generate(request.diagnosis, request.count, request.seed, request.steps)
        return {**{k: v for k, v in out.items() if k != "pngs"}, "images": [_data_url(p) for p in out["pngs"]]}

    @api.get(
        "/generate/{diagnosis}.png",
        summary="One reference image of a diagnosis",
        responses={200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    async def generate_png(
        self,
        diagnosis: DiagnosisCode,
        seed: int = Query(0, ge=0, le=2**31 - 1),
        steps: int | None = Query(None, ge=1, le=1000),
        api_key: str | None = Security(api_key_header),
    ) -> Response:
        check_api_key(self.api_key, api_key)
        out = await self._generate(diagnosis, 1, seed, steps)
        return Response(out["pngs"][0], media_type="image/png", headers={"X-Adapter": out["adapter"]})

    # -- the chain --

    @api.post("/chain", summary="Upload -> predicted diagnosis and attributes -> similar cases -> generated references")
    async def chain(
        self,
        file: UploadFile = File(...),
        k: int = Query(8, ge=1, le=HARD_MAX_K),
        count: int = Query(2, ge=1, le=HARD_MAX_IMAGES),
        seed: int = Query(0, ge=0, le=2**31 - 1),
        steps: int | None = Query(None, ge=1, le=1000),
        guide: Literal["none", "upload", "similar"] | None = Query(
            None,
            description="what the references are generated from: the upload (img2img), the best-matching case's "
            "thumbnail, or the diagnosis alone; default serve.chain_guide",
        ),
        api_key: str | None = Security(api_key_header),
    ) -> dict[str, Any]:
        check_api_key(self.api_key, api_key)
        check_count(count, self.settings.max_images)
        mode = guide or self.settings.chain_guide
        if self.generation is not None:  # steps no generation can run fail before the search, not after it
            # (a "similar" guide may turn out absent, and then fewer steps do: that one is checked after the search)
            self._steps(steps, guided=mode == "upload")
        upload = await self._read(file)
        started = time.perf_counter()
        k = check_k(k, self.settings.max_k)
        found = json.loads(await self._call(self.retrieval.search_image, upload, k, True, timeout=self.settings.call_timeout_s))
        searched = time.perf_counter()
        # The classifier's diagnosis, else the one most similar cases share; None when there is neither
        # (then no references are generated, and the answer says why).
        diagnosis = chain_diagnosis(found["query"], found["results"])
        generated, not_generated = None, None
        if diagnosis is None:
            not_generated = "no diagnosis: the classifier does not predict diagnoses and no similar case has one"
        elif self.generation is None:
            not_generated = "generation is not deployed"
        else:
            source, image = chain_guide(mode, upload, found["results"])
            out = await self._generate(diagnosis["code"], count, seed, steps, image)
            generated = {
                **{k: v for k, v in out.items() if k != "pngs"},
                "guide": source,
                "images": [_data_url(p) for p in out["pngs"]],
            }
        done = time.perf_counter()
        return {
            "query": found["query"],
            "diagnosis": diagnosis,
            "similar": found["results"],
            "generated": generated,
            "not_generated": not_generated,
            "timings_ms": {"search": round(1000 * (searched - started), 1), "generate": round(1000 * (done - searched), 1)},
        }


# --- Building the application ---------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def _absolute_local(cfg: DermarayConfig, base: Path) -> DermarayConfig:
    """Local paths made absolute against `base`: replicas do not run in the directory the app was built from."""

    def resolve(value: str) -> str:
        if is_remote(value):
            return value
        value = value.removeprefix("file://")
        return value if os.path.isabs(value) else str(base / value)

    s = cfg.serve
    for name in (*ARTIFACTS, "api_key_file"):
        if getattr(s, name):
            setattr(s, name, resolve(getattr(s, name)))
    cfg.models.cache_dir = resolve(cfg.models.cache_dir)
    return cfg


def app_from_config(cfg: DermarayConfig, base: Path | None = None, options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The application; `options`: deployment name -> `.options(...)` arguments (what a Serve config file's
    `deployments` entries set), e.g. {"Generation": {"ray_actor_options": {"num_cpus": 1}}}."""
    cfg = _absolute_local(cfg.model_copy(deep=True), base or Path.cwd())
    config = cfg.model_dump(mode="json")
    options = options or {}
    retrieval, ingress = None, {}
    if cfg.serve.retrieval_in_ingress:  # the ingress replica does the model work: Retrieval's CPUs, no Retrieval
        ingress = {"ray_actor_options": Retrieval.ray_actor_options}
    else:
        retrieval = Retrieval.options(**options.get("Retrieval", {})).bind(config)
    generation = None
    if cfg.serve.diffusion:
        generation_deployment = serve.deployment(
            generation_class(cfg.serve.max_adapters_per_replica),
            name="Generation",
            ray_actor_options={"num_cpus": 0.5},
            max_ongoing_requests=8,
            autoscaling_config={"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1, "target_ongoing_requests": 2},
        )
        generation = generation_deployment.options(**options.get("Generation", {})).bind(config)
    return Ingress.options(**{**ingress, **options.get("Ingress", {})}).bind(retrieval, generation, config)


def build_app(args: dict[str, str]) -> Any:
    """Serve's application builder: `config=<yaml>` plus `section.key=value` overrides (or `overrides: [...]`)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    overrides += [f"{key}={value}" for key, value in args.items()]
    # `serve run` starts in the repository; `serve deploy` builds the app inside the Serve
    # controller, whose directory is elsewhere: relative paths then mean the repository's.
    base = Path.cwd()
    if path and not os.path.isabs(path) and not Path(path).exists() and (REPO_ROOT / path).exists():
        base = REPO_ROOT
    return app_from_config(load_config(base / path if path else None, overrides), base)


__all__ = ["Ingress", "Retrieval", "app_from_config", "build_app", "generation_class"]
