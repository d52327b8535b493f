"""Image + note classifier (method C): both projected to a shared space, contrastive + classification.

The image branch is the grounding embedder (optionally starting from a grounded model); the
note branch is a projection of frozen text-encoder embeddings. One model carries two heads,
so one run answers "does the note help?": `image` classifies from the image projection alone,
`fused` from image and note projections together.

    loss = CLIP(image, note) + CE(image head) + CE(fused head)
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dermaray.config import ModelsConfig
from dermaray.grounding.model import ImageEmbedder, load_model, merge_lora

WEIGHTS_FILE = "classifier.pt"
SETTINGS_FILE = "classifier.json"


@dataclass
class ClassifierSettings:
    model: str  # grounding_mllm preset name or path: the image tower's architecture and base weights
    classes: list[str]
    text_encoder: str
    text_dim: int
    projection_dim: int = 128
    tune_image: bool = True  # train the tower and projector (else only the projections and heads)
    label: str = "diagnosis"  # what `classes` are (dermaray.grounding.labels); checkpoints before it: diagnosis
    # The tower's hidden layer the image branch reads: a grounded start's (grounding.feature_layer); None: the base's own
    feature_layer: int | None = None
    class_weights: list[float] | None = None  # cross-entropy weight per class (None: equal)
    # The side of the square the tower sees: a grounded start's (grounding.image_size); None: the base processor's
    image_size: int | None = None


class MultimodalClassifier(nn.Module):
    def __init__(self, embedder: ImageEmbedder, settings: ClassifierSettings):
        super().__init__()
        self.settings = settings
        self.image = embedder
        d = settings.projection_dim
        self.image_projection = nn.Sequential(nn.Linear(embedder.dim, d), nn.GELU(), nn.Linear(d, d))
        self.text_projection = nn.Sequential(nn.Linear(settings.text_dim, d), nn.GELU(), nn.Linear(d, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.image_head = nn.Linear(d, len(settings.classes))
        self.fused_head = nn.Linear(2 * d, len(settings.classes))
        for p in self.image.parameters():
            p.requires_grad = settings.tune_image

    @classmethod
    def build(cls, settings: ClassifierSettings, models: ModelsConfig, init_from: str | None = None) -> MultimodalClassifier:
        """`init_from`: a local grounding model folder whose (grounded) tower starts the image branch."""
        if init_from:
            grounded = load_model(init_from, models)[0]
            embedder = merge_lora(grounded.embedder)
            # Its base and side, so that a reloaded classifier is built as this tower and sees what it learned on.
            settings = replace(settings, model=grounded.settings.model, image_size=grounded.settings.image_size)
        else:
            from dermaray.models.registry import resolve_model

            embedder = ImageEmbedder.from_pretrained(resolve_model("grounding_mllm", settings.model, models))
            if settings.feature_layer is not None:
                embedder.use_layer(settings.feature_layer)
        # Saved with the weights, so a reloaded classifier (built from the base, not the grounded start) reads that
        # layer, and whatever preprocesses for it (classifier_processor) resizes to the side the tower learned.
        return cls(embedder, replace(settings, feature_layer=embedder.feature_layer))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_projection(self.image(pixel_values)), dim=-1)

    def encode_text(self, text_embedding: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_projection(text_embedding), dim=-1)

    def forward(self, pixel_values: torch.Tensor, text_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        image, text = self.encode_image(pixel_values), self.encode_text(text_embedding)
        return {
            "image": image,
            "text": text,
            "image_logits": self.image_head(image),
            "fused_logits": self.fused_head(torch.cat([image, text], dim=-1)),
        }


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: lesion i's image and note are the positive pair."""
    logits = logit_scale.exp().clamp(max=100) * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def classifier_loss(model: MultimodalClassifier, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    weights = model.settings.class_weights
    weight = None if weights is None else torch.as_tensor(weights, dtype=out["image_logits"].dtype, device=labels.device)
    return (
        clip_loss(out["image"], out["text"], model.logit_scale)
        + nn.functional.cross_entropy(out["image_logits"], labels, weight=weight)
        + nn.functional.cross_entropy(out["fused_logits"], labels, weight=weight)
    )


def require_diagnosis_classifier(settings: ClassifierSettings, what: str) -> None:
    """Refuse a classifier trained on another label where diagnoses are needed (e.g. as a judge of generated diagnoses)."""
    if settings.label != "diagnosis":
        raise ValueError(
            f"{what} predicts {settings.label!r} ({', '.join(settings.classes)}), not diagnoses; "
            "train one with classifier.label=diagnosis"
        )


def classifier_settings(uri: str, storage_options: dict | None = None) -> ClassifierSettings:
    """The settings of a classifier checkpoint at any URI, without loading its weights."""
    from dermaray.storage import join, read_bytes

    return ClassifierSettings(**json.loads(read_bytes(join(uri, SETTINGS_FILE), storage_options))["settings"])


def classifier_processor(settings: ClassifierSettings, models: ModelsConfig) -> Any:
    """The image processor a classifier's inputs go through: its base's, at the side its tower learned."""
    from dermaray.grounding.data import image_processor
    from dermaray.models.registry import resolve_model

    return image_processor(resolve_model("grounding_mllm", settings.model, models), settings.image_size)


def save_classifier(folder: str | Path, model: MultimodalClassifier, extra: dict[str, Any] | None = None) -> None:
    """The whole state (the tower may have been fine-tuned from a grounded start)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": asdict(model.settings), **(extra or {})}, indent=2))


def load_classifier(folder: str | Path, models: ModelsConfig) -> MultimodalClassifier:
    folder = Path(folder)
    if not (folder / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a classifier checkpoint (no {SETTINGS_FILE})")
    settings = ClassifierSettings(**json.loads((folder / SETTINGS_FILE).read_text())["settings"])
    model = MultimodalClassifier.build(settings, models)
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def weights_digest(folder: str | Path) -> str:
    """The digest of a local checkpoint's weights: what an index of its projections records of it."""
    return hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()


class ImageProjector:
    """A classifier checkpoint (any URI) loaded on this node: images -> its image projections, the space its
    note projections share (what search by note text searches). As a Ray Data actor: lesion rows ->
    (lesion_id, embedding)."""

    def __init__(self, uri: str, models: ModelsConfig, storage_options: dict | None = None, device: str | None = None):
        from dermaray.storage import download_folder

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._folder = tempfile.TemporaryDirectory(prefix="classifier-")
        local = download_folder(uri, self._folder.name, storage_options)
        self.weights = weights_digest(local)
        self.classifier = load_classifier(local, models).to(self.device)
        self.processor = classifier_processor(self.classifier.settings, models)

    @torch.no_grad()
    def project(self, images: list) -> np.ndarray:
        """[B, projection_dim] float32 image projections of decoded images."""
        pixels = torch.as_tensor(self.processor(images=images, return_tensors="np")["pixel_values"], device=self.device)
        return self.classifier.encode_image(pixels).cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dermaray.images import decode_rgb

        if not len(batch["lesion_id"]):  # a batch with no rows: the processor refuses an empty list
            return {
                "lesion_id": batch["lesion_id"],
                "embedding": np.zeros((0, self.classifier.settings.projection_dim), np.float32),
            }
        return {"lesion_id": batch["lesion_id"], "embedding": self.project([decode_rgb(b) for b in batch["image_bytes"]])}
