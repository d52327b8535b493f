"""Lesion rows -> embeddings (and predicted attributes), with a grounded or a frozen model.

`LesionEmbedder` is a batch function over the canonical table: Ray Data runs it in an actor
pool (jobs.embeddings), the Serve app and the evaluation call it directly.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dermaray.config import ModelsConfig
from dermaray.grounding.data import PIXELS, Preprocessor
from dermaray.grounding.model import SETTINGS_FILE, WEIGHTS_DIGEST, AttributeScaler, GroundingModel, ImageEmbedder, load_model
from dermaray.models.registry import resolve_model
from dermaray.schema import ATTRIBUTE_NAMES
from dermaray.storage import download_folder, join, read_bytes

FROZEN = "frozen"
CARRIED = ("lesion_id", "split", "domain", "patient_id", "diagnosis", *ATTRIBUTE_NAMES)
THUMBNAIL = "thumbnail"  # the lesion's JPEG thumbnail, carried when the embeddings job adds it
PREDICTED_PREFIX = "predicted_"


def frozen_identity(base: str) -> dict[str, str | None]:
    return {"model": f"{base}:frozen", "weights": None}  # a preset's weights are its pinned revision


def grounded_identity(model: str, settings: dict[str, Any]) -> dict[str, str | None]:
    """`settings`: the model folder's settings file, as `load_model` returns what it does not consume."""
    return {"model": model, "weights": settings.get(WEIGHTS_DIGEST)}


def model_identity(model: str, base: str, storage_options: dict | None = None) -> dict[str, str | None]:
    """What an index records of the model that made its vectors: its URI (or the frozen base) and the digest
    of its weights; read from the model folder's settings file, without loading the model."""
    if model == FROZEN:
        return frozen_identity(base)
    return grounded_identity(model, json.loads(read_bytes(join(model, SETTINGS_FILE), storage_options)))


def require_index_of(index_meta: dict[str, Any], identity: dict[str, str | None], index_uri: str) -> None:
    """Refuse an index whose vectors another model made: its neighbours would be meaningless for this one's queries.
    Weights decide when both sides record them (a model retrained in place keeps its URI); else the model names."""
    built, weights = index_meta.get("model"), index_meta.get("model_weights")
    if weights and identity["weights"]:
        same = weights == identity["weights"]
    else:
        same = built is None or built == identity["model"]
    if not same:
        raise ValueError(
            f"the index at {index_uri} was built with model {built} (weights {weights or 'not recorded'}), but this "
            f"replica loads {identity['model']} (weights {identity['weights'] or 'not recorded'}): re-run the "
            "embeddings job with this model, or point serve.index at the index built with it"
        )


class LesionEmbedder:
    """`model`: a grounding model folder (any URI), or "frozen" for the untuned base `base`."""

    def __init__(
        self, model: str, base: str, models: ModelsConfig, storage_options: dict | None = None, device: str | None = None
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.scaler: AttributeScaler | None = None
        if model == FROZEN:
            self.network: torch.nn.Module = ImageEmbedder.from_pretrained(resolve_model("grounding_mllm", base, models))
            self.identity = frozen_identity(base)
        else:
            self._folder = tempfile.TemporaryDirectory(prefix="grounding-")
            local = download_folder(model, self._folder.name, storage_options)
            grounded, self.scaler, extra = load_model(local, models)
            self.network, base = grounded, grounded.settings.model
            self.identity = grounded_identity(model, extra)
        self.model_id = self.identity["model"]
        self.network.to(self.device).eval()
        image_size = self.network.settings.image_size if isinstance(self.network, GroundingModel) else None
        self.preprocess = Preprocessor(base, models, keep=(), image_size=image_size)

    @property
    def attributes(self) -> list[str]:
        return list(self.scaler.names) if self.scaler else []

    @torch.no_grad()
    def embed_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit-norm embeddings [B, D], predicted attributes in native units [B, A] or None)."""
        x = torch.as_tensor(pixels, device=self.device)
        # On a GPU the forward pass runs in bfloat16 (tensor cores); the weights stay float32 and
        # the embedding is normalised in float32. CPUs keep float32 (no AMX here).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self._embed(x)

    def _embed(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(self.network, GroundingModel):
            out = self.network(x)
            z, predicted = out["embedding"], self.scaler.inverse(out["attributes"].float().cpu().numpy())
        else:
            z, predicted = self.network(x), None
        z = torch.nn.functional.normalize(z.float(), dim=-1)
        return z.cpu().numpy().astype(np.float32), predicted

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = self.preprocess({"image_bytes": batch["image_bytes"]})[PIXELS]
        z, predicted = self.embed_pixels(pixels)
        out: dict[str, Any] = {k: batch[k] for k in (*CARRIED, THUMBNAIL) if k in batch}
        # A plain fixed-size list column: readable by pandas, DuckDB, Spark, not only Ray.
        out["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])
        for i, name in enumerate(self.attributes):
            out[PREDICTED_PREFIX + name] = predicted[:, i].astype(np.float32)
        return pa.table(out)
