"""The grounded image embedding: an MLLM's vision tower + projector, with attribute heads.

The embedding is what the language model sees of an image: the projector's output tokens,
mean-pooled. Linear regression heads (one per attribute, on z-scored targets) sit on that
embedding, so grounding has to make the attributes linearly readable from the embedding
itself, which is what attribute-specific retrieval then searches; with `heads_read: direction`
they read its direction (L2-normalised, rescaled to length sqrt(dim)), the part the cosine
index compares.

    model = GroundingModel.from_pretrained(resolve_model("grounding_mllm", "tiny", cache), ["area_mm2"], tune="full")
    z = model.embed(pixel_values)                   # [B, D]
    predictions = model(pixel_values)["attributes"]  # [B, n_attributes], z-scored

A checkpoint holds only what training changed (the trainable weights), the attribute
scaler and the settings; the base weights are re-read from the model path, so a LoRA
checkpoint of a 7B model stays small.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import field_validator
from torch import nn
from torch.nn import functional as F

from dermaray.config import GroundingSpec, ModelsConfig
from dermaray.grounding.vision import ImageEmbedder
from dermaray.schema import ATTRIBUTES_BY_NAME


def is_size(name: str) -> bool:
    """Lengths and areas: log-normal-like, so they are learned on a log scale."""
    return ATTRIBUTES_BY_NAME[name].unit in ("mm", "mm²")


@dataclass
class AttributeScaler:
    """z = (f(value) - mean) / std per attribute, fitted on the training split; f = log for sizes.

    On a log scale a 1 mm² error on a 2 mm² lesion weighs what a 10 mm² error on a 20 mm² one
    does, so small lesions are ranked as well as large ones.
    """

    names: list[str]
    mean: list[float]
    std: list[float]
    log: list[bool]

    @classmethod
    def fit(cls, names: Sequence[str], values: np.ndarray, log_sizes: bool = True) -> AttributeScaler:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(names) or len(values) < 2:
            raise ValueError(f"need [rows >= 2, {len(names)}] attribute values to fit a scaler, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("attribute values to fit a scaler must be finite (ingest quarantines NaN rows)")
        log = [log_sizes and is_size(n) and bool((values[:, i] > 0).all()) for i, n in enumerate(names)]
        scaled = np.where(log, np.log(np.maximum(values, 1e-12)), values)
        std = scaled.std(axis=0)
        flat = [n for n, s in zip(names, std, strict=True) if s < 1e-9]
        if flat:
            raise ValueError(f"attributes {flat} are constant in the training split: nothing to ground")
        return cls(list(names), scaled.mean(axis=0).tolist(), std.tolist(), log)

    def transform(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float64)
        scaled = np.where(self.log, np.log(np.maximum(values, 1e-12)), values)
        return ((scaled - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        scaled = np.asarray(z, np.float64) * self.std + self.mean
        return np.where(self.log, np.exp(scaled), scaled)


class GroundingSettings(GroundingSpec):
    """What defines a grounding model apart from its weights: the grounding section's spec and the base
    model; saved with every checkpoint."""

    model: str  # a grounding_mllm preset name, or a path / hub id for from_pretrained

    def __init__(self, model: str, attributes: list[str], **spec: Any) -> None:
        super().__init__(model=model, attributes=attributes, **spec)

    @field_validator("attributes")
    @classmethod
    def _known(cls, attributes: list[str]) -> list[str]:
        unknown = [a for a in attributes if a not in ATTRIBUTES_BY_NAME]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; valid: {', '.join(ATTRIBUTES_BY_NAME)}")
        if not attributes:
            raise ValueError("ground at least one attribute")
        return attributes


class GroundingModel(nn.Module):
    def __init__(self, embedder: ImageEmbedder, settings: GroundingSettings):
        super().__init__()
        self.settings = settings
        self.embedder = embedder
        self.heads = nn.Linear(embedder.dim, len(settings.attributes))  # one linear head per attribute, as rows
        self._set_trainable()

    @classmethod
    def from_settings(cls, settings: GroundingSettings, models: ModelsConfig) -> GroundingModel:
        from dermaray.models.registry import resolve_model

        embedder = ImageEmbedder.from_pretrained(resolve_model("grounding_mllm", settings.model, models))
        if settings.feature_layer is not None:
            embedder.use_layer(settings.feature_layer)
        if settings.tune == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=settings.lora_targets)
            inject_adapter_in_model(lora, embedder.vision_tower)
        return cls(embedder, settings)

    def _set_trainable(self) -> None:
        tune = self.settings.tune
        for name, p in self.embedder.named_parameters():
            p.requires_grad = (
                tune == "full"
                or (tune in ("projector", "lora") and name.startswith("projector."))
                or (tune == "lora" and "lora_" in name)
            )
        for p in self.heads.parameters():
            p.requires_grad = True

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embedder(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.embedder(pixel_values)
        read = z if self.settings.heads_read == "embedding" else F.normalize(z, dim=-1) * z.shape[-1] ** 0.5
        return {"embedding": z, "attributes": self.heads(read)}

    def _trained(self) -> set[str]:
        """The state training changes: trainable weights, and the buffers of the layers they sit in (a batch norm's
        running statistics)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        for prefix, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                names |= {f"{prefix}.{b}" for b, _ in module.named_buffers(recurse=False)}
        return names & set(self.state_dict())  # persistent buffers only

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights (and statistics) training changes; the rest is re-read from the base model."""
        names = self._trained()
        return {n: t.detach().cpu() for n, t in self.state_dict().items() if n in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self._trained()
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.load_state_dict(state, strict=False)  # only the trainable part: the rest is the base model


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold injected LoRA adapters into their base layers, leaving the plain architecture."""
    for name, child in list(module.named_modules()):
        if hasattr(child, "merge") and hasattr(child, "get_base_layer"):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
    return module


def loss_fn(
    predicted: torch.Tensor, target_z: torch.Tensor, weights: torch.Tensor | None = None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Huber on z-scored attributes: robust to the odd extreme lesion, averaged over attributes.
    `keep` [B, A]: 0 where a view no longer shows an attribute's true value (dermaray.grounding.photometric)."""
    huber = nn.functional.huber_loss(predicted, target_z, reduction="none", delta=1.0)
    if keep is None:
        keep = torch.ones_like(huber)
    per_attribute = (huber * keep).sum(dim=0) / keep.sum(dim=0).clamp(min=1)
    weights = torch.ones_like(per_attribute) if weights is None else weights
    weights = weights * (keep.sum(dim=0) > 0)  # an attribute no view of this batch kept does not dilute the others
    return (per_attribute * weights).sum() / weights.sum().clamp(min=1e-12)


def augment(pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flips and quarter turns per batch: every grounded attribute is invariant to them."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    out = torch.rot90(pixel_values, k, dims=(-2, -1))
    if int(torch.randint(0, 2, (1,), generator=generator)):
        out = out.flip(-1)
    return out


# --- Checkpoint files -------------------------------------------------------------------------

WEIGHTS_FILE = "trainable.pt"
SETTINGS_FILE = "grounding.json"
WEIGHTS_DIGEST = "weights_sha256"  # in SETTINGS_FILE: the digest of WEIGHTS_FILE


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def save_model(folder: str | Path, model: GroundingModel, scaler: AttributeScaler, extra: dict[str, Any] | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.trainable_state(), folder / WEIGHTS_FILE)
    payload = {
        "settings": model.settings.model_dump(),
        "scaler": asdict(scaler),
        # What an index built with this model records, so a replica can tell a retrained model from it.
        WEIGHTS_DIGEST: weights_digest(folder),
        **(extra or {}),
    }
    (folder / SETTINGS_FILE).write_text(json.dumps(payload, indent=2))


def grounding_settings(uri: str, storage_options: dict | None = None) -> GroundingSettings:
    """The settings of a grounding checkpoint at any URI, without loading its weights."""
    from dermaray.storage import join, read_bytes

    return GroundingSettings(**json.loads(read_bytes(join(uri, SETTINGS_FILE), storage_options))["settings"])


def load_model(folder: str | Path, models: ModelsConfig) -> tuple[GroundingModel, AttributeScaler, dict[str, Any]]:
    """(model in eval mode, scaler, the rest of grounding.json) from a folder `save_model` wrote."""
    folder = Path(folder)
    if not (folder / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a grounding checkpoint (no {SETTINGS_FILE})")
    payload = json.loads((folder / SETTINGS_FILE).read_text())
    digest = payload.get(WEIGHTS_DIGEST)  # absent in folders saved before digests were recorded
    if digest and weights_digest(folder) != digest:
        raise ValueError(f"{folder}: {WEIGHTS_FILE} is not the file {SETTINGS_FILE} was saved with (an interrupted copy?)")
    settings = GroundingSettings(**payload.pop("settings"))
    scaler = AttributeScaler(**payload.pop("scaler"))
    model = GroundingModel.from_settings(settings, models)
    model.load_trainable_state(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), scaler, payload
