"""Evaluate diagnosis -> image generation: base vs LoRA, judged by an independent classifier.

    python -m jobs.diffusion_eval --config configs/local.yaml

For every diagnosis, the base and the adapted pipeline generate the same number of images from
the same seeds and prompts. The image head of the classifier trained on real lesions
(jobs.classifier) judges them:

- class relevance: share of generated images classified as the prompted diagnosis;
- KID between generated and held-out real images, on that classifier's image features
  (real images resized to the generation size first, so size alone does not separate them);
- size faithfulness: "large" vs "small" prompts, lesion area measured on the generated pixels;
- image-guided references (a held-out lesion guides each image of its diagnosis): img2img at
  guide_strength and its sweep, and through the base's IP-Adapter when it has one;
- sample grids (one row per diagnosis) as PNG for the report.

Generation runs in one Ray task (`diffusion_eval.num_gpus` on clusters).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch
from PIL import Image

from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig, ModelsConfig
from dermaray.diffusion import denoising_steps
from dermaray.diffusion.base import base_resolution, prepared_base_uri
from dermaray.diffusion.captions import caption
from dermaray.diffusion.evaluate import (
    class_relevance,
    faithfulness,
    image_grid,
    kid,
    lesion_area_mm2,
    lesion_contrast,
    markdown,
    pixel_change,
    size_faithfulness,
)
from dermaray.diffusion.ip_adapter import base_ip_adapter
from dermaray.diffusion.pipeline import LORA_WEIGHT_NAME, generate, load_pipeline, vae_round_trip
from dermaray.grounding.classifier import (
    classifier_processor,
    classifier_settings,
    load_classifier,
    require_diagnosis_classifier,
)
from dermaray.grounding.data import CLASS_CODES
from dermaray.images import decode_rgb
from dermaray.layout import PER_DIAGNOSIS_ADAPTERS, SHARED_ADAPTER
from dermaray.models.registry import model_folder
from dermaray.storage import absolute, download_folder, join, read_parquet, take_parquet, write_bytes
from jobs.common import clear_summary, init_ray, log, write_summary


class ImageJudge:
    """The classifier's image branch: predicted class and image features for PIL images."""

    def __init__(self, folder: str, models: ModelsConfig, device: torch.device):
        self.model = load_classifier(folder, models).to(device)
        require_diagnosis_classifier(self.model.settings, f"the judge {folder}")
        self.processor = classifier_processor(self.model.settings, models)
        self.classes = list(self.model.settings.classes)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list) -> tuple[list[str], np.ndarray]:
        pixels = torch.as_tensor(self.processor(images=images, return_tensors="np")["pixel_values"], device=self.device)
        features = self.model.encode_image(pixels)
        predicted = self.model.image_head(features).argmax(1).tolist()
        return [self.classes[i] for i in predicted], features.cpu().numpy()


@contextmanager
def timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Record how long `part` of the evaluation took in `seconds` (the summary's "seconds": where its time goes)."""
    started = time.perf_counter()
    yield
    seconds[part] = round(time.perf_counter() - started, 1)
    log.info("diffusion_eval: %s took %.1f s", part, seconds[part])


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def adapters_by_class(folder: str | None, codes: list[str]) -> dict[str, str | None]:
    """Each diagnosis' adapter folder: the shared adapter, `<folder>/<code>` per diagnosis, or None (the base)."""
    if folder is None:
        return dict.fromkeys(codes)
    if (Path(folder) / LORA_WEIGHT_NAME).is_file():
        return dict.fromkeys(codes, folder)
    missing = [c for c in codes if not (Path(folder) / c / LORA_WEIGHT_NAME).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds neither a shared adapter nor per-diagnosis adapters for {missing}")
    return {c: str(Path(folder) / c) for c in codes}


def generate_by_class(pipe: Any, adapters: dict[str, str | None], n: int, settings: dict, size: str | None = None) -> list:
    """`n` images per diagnosis (class-major), each diagnosis with its adapter; image i is seeded `seed + i`.

    Distinct seeds across diagnoses: KID takes the images as independent draws (shared seeds make a
    diagnosis-free base's images near-copies across diagnoses, which inflates it)."""
    images = []
    for index, (code, adapter) in enumerate(adapters.items()):
        images += generate(
            pipe,
            [caption(code, size)],
            n,
            seed=settings["seed"] + index * n,
            steps=settings["steps"],
            guidance_scale=settings["guidance_scale"],
            adapter_folder=adapter,
            resolution=settings["resolution"],
        )
    return images


def guided_by_class(
    pipe: Any, adapters: dict[str, str | None], guides: dict[str, list], settings: dict, strength: float, ip_scale: float | None
) -> list:
    """One image per guide (class-major, the order of `guides`), each from its diagnosis' caption and adapter; with
    `ip_scale`, the guide is also its image prompt through settings["ip_adapter"] at that scale."""
    images, offset = [], 0
    for code, adapter in adapters.items():
        if guides[code]:
            images += generate(
                pipe,
                [caption(code)] * len(guides[code]),
                1,
                seed=settings["seed"] + offset,
                steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                adapter_folder=adapter,
                resolution=settings["resolution"],
                guides=guides[code],
                strength=strength,
                **({} if ip_scale is None else {"ip_adapter_folder": settings["ip_adapter"], "ip_adapter_scale": ip_scale}),
            )
        offset += len(guides[code])
    return images


MEASURES = {"area": lesion_area_mm2, "contrast": lesion_contrast}  # what a generated lesion is scored on against its guide


def measured(images: list) -> dict[str, list[float]]:
    """Each MEASURES measure of every image, measured on its pixels."""
    return {name: [measure(image) for image in images] for name, measure in MEASURES.items()}


def follows(guides: dict[str, list[float]], images: list) -> dict[str, dict]:
    """How closely each generated lesion follows its guide (`faithfulness`) in each measure; `guides`: `measured`."""
    generated = measured(images)
    return {name: faithfulness(guides[name], generated[name]) for name in MEASURES}


def guided_run(
    pipe: Any,
    judge: ImageJudge,
    adapters: dict[str, str | None],
    guides: dict[str, list],
    guide_measures: dict[str, list[float]],
    reference: np.ndarray | None,
    settings: dict,
    strength: float,
    ip_scale: float | None = None,
) -> tuple[dict[str, Any], list]:
    """One image per guide at `strength` (and through the IP-Adapter at `ip_scale`): its class relevance, KID against
    `reference` (real images' features, the guides left out; None: not computed), how closely it follows its guide
    (`guide_measures`: `measured` of the guides) and how much of the guide's pixels it changed; and the images."""
    images = guided_by_class(pipe, adapters, guides, settings, strength, ip_scale)
    predicted, features = judge(images)
    return {
        "strength": strength,
        **({} if ip_scale is None else {"ip_adapter_scale": ip_scale}),
        "denoising_steps": denoising_steps(settings["steps"], strength),
        "class_relevance": class_relevance([c for c in adapters for _ in guides[c]], predicted),
        "kid": None
        if reference is None
        else dict(zip(("mean", "std"), kid(reference, features, subset_size=min(100, len(images))), strict=True)),
        "pixel_change": pixel_change([g for c in adapters for g in guides[c]], images),
        **follows(guide_measures, images),
    }, images


def guided_results(
    pipe: Any,
    judge: ImageJudge,
    adapters: dict[str, str | None],
    real: list,
    real_labels: list[str],
    real_features: np.ndarray,
    diagnosis_only: list,
    settings: dict,
    codes: list[str],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Image-guided references: each of up to n held-out lesions per diagnosis guides one image of its diagnosis.

    {"guided": `guided_run` at guide_strength; "guide_sweep": `guided_run` at guide_strength and at each
    guide_sweep strength that runs another number of denoising steps, by strength (what following the guide
    more closely costs in change and relevance); "diagnosis_only": how closely the diagnosis-only images
    (`diagnosis_only`, n per diagnosis) paired with the same guides do, the baseline; "vae_round_trip": how
    closely the guides themselves do after the VAE alone, the ceiling; "grid": guide / result pairs at
    guide_strength; with settings["ip_adapter"], "ip_adapter": `guided_run` through the IP-Adapter at each of
    ip_adapter_scales, from noise and at guide_strength, and "ip_grid", the pairs of the first (from noise)}, or
    {"guided_skipped": why} with fewer than 3 guides. Each part's time goes to `seconds` (`timed`)."""
    n, size, steps = settings["images_per_class"], settings["resolution"], settings["steps"]
    chosen = {c: [i for i, label in enumerate(real_labels) if label == c][:n] for c in codes}
    guides = {c: [real[i] for i in chosen[c]] for c in codes}
    flat = [g for c in codes for g in guides[c]]
    if len(flat) < 3:
        return {"guided_skipped": f"{len(flat)} held-out lesions of the generated diagnoses; a rank correlation needs 3"}
    # KID against the real images that guide nothing: a result close to its guide is not thereby close to the rest.
    others = np.setdiff1d(np.arange(len(real)), [i for c in codes for i in chosen[c]])
    reference = real_features[others] if len(others) >= 2 else None
    paired = [diagnosis_only[i * n + j] for i, c in enumerate(codes) for j in range(len(guides[c]))]
    guide_measures = measured(flat)  # once, for every comparison
    baseline = follows(guide_measures, paired)
    # The ceiling: each guide through the VAE alone (strength -> 0), measured as a result is.
    round_trip = vae_round_trip(pipe.vae, flat, size)

    def at_strength(strength: float, ip_scale: float | None = None) -> tuple[dict[str, Any], list]:
        return guided_run(pipe, judge, adapters, guides, guide_measures, reference, settings, strength, ip_scale)

    with timed(seconds, "guided"):
        headline, images = at_strength(settings["guide_strength"])
    # One strength per number of denoising steps: two that run the same steps give the same images.
    by_steps = {headline["denoising_steps"]: headline}
    with timed(seconds, "guide_sweep"):
        for strength in sorted(settings.get("guide_sweep") or ()):
            if denoising_steps(steps, strength) not in by_steps:
                by_steps[denoising_steps(steps, strength)] = at_strength(strength)[0]
    # The IP-Adapter from noise (strength 1: the guide reaches the image as an image prompt only), and with img2img
    # at guide_strength (the image prompt on top of the noised guide), at each scale.
    by_scale: dict[tuple[float, float], tuple[dict[str, Any], list]] = {}
    if settings["ip_adapter"]:
        with timed(seconds, "ip_adapter"):
            by_scale = {
                (scale, strength): at_strength(strength, scale)
                for scale in settings["ip_adapter_scales"]
                for strength in dict.fromkeys((1.0, settings["guide_strength"]))
            }
    # A row per diagnosis: guide, result, guide, result, ... (white cells where a diagnosis has fewer guides)
    shown, blank = min(n, 4), Image.new("RGB", (size, size), "white")
    starts = np.cumsum([0] + [len(guides[c]) for c in codes])

    def grid(results: list) -> bytes:
        cells = [
            img
            for c, start in zip(codes, starts, strict=False)
            for j in range(shown)
            for img in ((flat[start + j], results[start + j]) if j < len(guides[c]) else (blank, blank))
        ]
        return png(image_grid(cells, 2 * shown, labels=list(codes), cell=max(64, size)))

    return {
        **(
            {"ip_adapter": [row for row, _ in by_scale.values()], "ip_grid": grid(next(iter(by_scale.values()))[1])}
            if by_scale
            else {}
        ),
        "guided": headline,
        "guide_sweep": [by_steps[k] for k in sorted(by_steps)],
        "diagnosis_only": {
            "guide_area": baseline["area"],
            "guide_contrast": baseline["contrast"],
            "guide_pixel_change": pixel_change(flat, paired),
        },
        "vae_round_trip": {**follows(guide_measures, round_trip), "pixel_change": pixel_change(flat, round_trip)},
        "grid": grid(images),
    }


@ray.remote
def evaluate_generation(
    base: str,
    adapter: str,
    judge: str,
    models: ModelsConfig,
    storage_options: dict,
    real_images: list[bytes],
    real_labels: list[str],
    settings: dict,
) -> dict[str, Any]:
    """On the node Ray picks (a GPU node on clusters): fetch base, adapters and judge there, evaluate on its device."""
    with tempfile.TemporaryDirectory(prefix="diffusion-eval-") as scratch:
        base_folder = model_folder("diffusion_base", base, models, storage_options, str(Path(scratch, "base")))
        if settings["ip_adapter"]:
            settings = {
                **settings,
                "ip_adapter": download_folder(settings["ip_adapter"], str(Path(scratch, "ip")), storage_options),
            }
        else:
            own = base_ip_adapter(base_folder)
            settings = {**settings, "ip_adapter": own and str(own)}
        return _evaluate(
            base_folder,
            download_folder(adapter, str(Path(scratch, "adapter")), storage_options),
            download_folder(judge, str(Path(scratch, "judge")), storage_options),
            models,
            real_images,
            real_labels,
            settings,
        )


def _evaluate(
    base: str,
    adapter: str,
    judge_folder: str,
    models: ModelsConfig,
    real_images: list[bytes],
    real_labels: list[str],
    settings: dict,
) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = ImageJudge(judge_folder, models, device)
    size, n, codes = settings["resolution"], settings["images_per_class"], settings["classes"]
    shared = adapter is None or (Path(adapter) / LORA_WEIGHT_NAME).is_file()
    # Per-diagnosis adapters: a diagnosis with too few training lesions has none (diffusion.min_lesions).
    without_adapter = [] if shared else [c for c in codes if not (Path(adapter) / c / LORA_WEIGHT_NAME).is_file()]
    codes = [c for c in codes if c not in without_adapter]
    if not codes:
        raise FileNotFoundError(f"{adapter} holds no adapter for any held-out diagnosis {settings['classes']}")
    seconds: dict[str, float] = {}
    with timed(seconds, "real"):
        real = [decode_rgb(b).resize((size, size)) for b in real_images]
        real_predicted, real_features = judge(real)
    with timed(seconds, "load_pipeline"):
        pipe = load_pipeline(base, device=device)
    prompted = [code for code in codes for _ in range(n)]
    # The judge's accuracy on held-out real images at the generation size: what a perfect
    # generator would score, so class relevance is read against it as well as against chance.
    results: dict[str, Any] = {"grids": {}, "real": {"class_relevance": class_relevance(real_labels, real_predicted)}}
    # The same images through the base's VAE: every generated image is a decode of that VAE, so what the judge reads
    # in these bounds any generator on this base (a VAE that loses a diagnosis' colour loses it for every adapter).
    with timed(seconds, "real_through_vae"):
        through_vae, _ = judge(vae_round_trip(pipe.vae, real, size))
    results["real_through_vae"] = {"class_relevance": class_relevance(real_labels, through_vae)}
    lora = adapters_by_class(adapter, codes)
    generated: dict[str, list] = {}
    for name, adapters in (("base", dict.fromkeys(codes)), ("lora", lora)):
        with timed(seconds, name):
            images = generated[name] = generate_by_class(pipe, adapters, n, settings)
            predicted, features = judge(images)
        results[name] = {
            "class_relevance": class_relevance(prompted, predicted),
            "kid": dict(
                zip(("mean", "std"), kid(real_features, features, subset_size=min(100, len(images), len(real))), strict=True)
            ),
        }
        columns = min(n, 8)
        rows = [img for i in range(len(codes)) for img in images[i * n : i * n + columns]]
        results["grids"][name] = png(image_grid(rows, columns, labels=list(codes), cell=max(64, size)))
    with timed(seconds, "size_faithfulness"):
        sizes = {
            word: [lesion_area_mm2(img) for img in generate_by_class(pipe, lora, max(1, n // 2), settings, word)]
            for word in ("large", "small")
        }
    results["lora"]["size_faithfulness"] = size_faithfulness(sizes["large"], sizes["small"])
    if settings["guide_strength"] is not None:
        guided = guided_results(pipe, judge, lora, real, real_labels, real_features, generated["lora"], settings, codes, seconds)
        if "ip_grid" in guided:
            results["grids"]["ip_adapter"] = guided.pop("ip_grid")
        if "grid" in guided:
            results["grids"]["guided"] = guided.pop("grid")
            results["lora"].update(guided.pop("diagnosis_only"))
        results.update(guided)
    results["seconds"] = seconds
    results["adapters"] = "shared" if shared else "per_diagnosis"
    results["diagnoses_without_adapter"] = without_adapter
    results["chance"] = 1 / len(judge.classes)
    return results


def run(cfg: DermarayConfig) -> dict:
    d, ev, options = cfg.diffusion, cfg.diffusion_eval, cfg.storage_options
    clear_summary(join(ev.output, "diffusion_eval.json"), options)
    # The judge classifies diagnoses: one trained on superclass or malignancy cannot (checked before any work).
    require_diagnosis_classifier(classifier_settings(ev.classifier, options), f"diffusion_eval.classifier {ev.classifier}")
    init_ray(cfg.ray)
    lesions = read_parquet(ev.real, options, columns=["split", "diagnosis"])  # images only for the rows kept, below
    adapter = ev.adapter or join(d.output, SHARED_ADAPTER if d.adapters == "shared" else PER_DIAGNOSIS_ADAPTERS)
    with_diagnosis = pc.fill_null(pc.and_(pc.equal(lesions["split"], "test"), pc.is_valid(lesions["diagnosis"])), False)
    held_out = lesions.filter(with_diagnosis)
    if held_out.num_rows < 2:
        raise ValueError(f"{ev.real} has {held_out.num_rows} test-split lesions; KID needs held-out real images")
    # URIs and presets only: the task fetches what it needs on its own node.
    base = ev.base or prepared_base_uri(cfg)
    settings = {
        "resolution": d.resolution or base_resolution(base, cfg.models, options),
        "images_per_class": ev.images_per_class,
        "seed": ev.seed,
        "steps": ev.steps,
        "guidance_scale": ev.guidance_scale,
        "guide_strength": ev.guide_strength,
        "guide_sweep": ev.guide_sweep,
        "ip_adapter": ev.ip_adapter and absolute(ev.ip_adapter),  # None: the base's own, if it has one (on the node)
        "ip_adapter_scales": ev.ip_adapter_scales,
        "classes": [c for c in CLASS_CODES if c in set(held_out["diagnosis"].to_pylist())],
    }
    log.info("diffusion_eval: %d images per class for %s, base vs LoRA", ev.images_per_class, settings["classes"])
    results = ray.get(
        evaluate_generation.options(num_cpus=ev.num_cpus, num_gpus=ev.num_gpus).remote(
            base,
            absolute(adapter),
            absolute(ev.classifier),
            cfg.models,
            options,
            take_parquet(ev.real, np.flatnonzero(with_diagnosis.to_numpy())[: ev.real_images], options, ["image_bytes"])[
                "image_bytes"
            ].to_pylist(),
            held_out["diagnosis"].to_pylist()[: ev.real_images],
            settings,
        )
    )
    for name, data in results.pop("grids").items():
        write_bytes(join(ev.output, f"grid_{name}.png"), data, options)
    write_bytes(join(ev.output, "diffusion_eval.md"), markdown(results).encode(), options)
    write_summary(join(ev.output, "diffusion_eval.json"), json.loads(json.dumps(results, default=float)), options)
    return results


if __name__ == "__main__":
    setup_logging()
    print(markdown(run(config_from_argv(sys.argv[1:], prog="python -m jobs.diffusion_eval"))))
