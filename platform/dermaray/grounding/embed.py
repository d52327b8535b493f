"""Lesion rows -> embeddings (and predicted attributes), with a grounded or a frozen model.

`LesionEmbedder` is a batch function over the canonical table: Ray Data runs it in an actor
pool (jobs.embeddings), the Serve app and the evaluation call it directly.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dermaray.config import ModelsConfig
from dermaray.grounding.data import PIXELS, Preprocessor
from dermaray.grounding.model import AttributeScaler, GroundingModel, ImageEmbedder, load_model
from dermaray.models.registry import resolve_model
from dermaray.schema import ATTRIBUTE_NAMES
from dermaray.storage import download_folder

FROZEN = "frozen"
CARRIED = ("lesion_id", "split", "domain", "patient_id", "diagnosis", *ATTRIBUTE_NAMES)
PREDICTED_PREFIX = "predicted_"


class LesionEmbedder:
    """`model`: a grounding model folder (any URI), or "frozen" for the untuned base `base`."""

    def __init__(
        self, model: str, base: str, models: ModelsConfig, storage_options: dict | None = None, device: str | None = None
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.scaler: AttributeScaler | None = None
        if model == FROZEN:
            self.network: torch.nn.Module = ImageEmbedder.from_pretrained(resolve_model("grounding_mllm", base, models))
            self.model_id = f"{base}:frozen"
        else:
            self._folder = tempfile.TemporaryDirectory(prefix="grounding-")
            local = download_folder(model, self._folder.name, storage_options)
            grounded, self.scaler, _ = load_model(local, models)
            self.network, base = grounded, grounded.settings.model
            self.model_id = model
        self.network.to(self.device).eval()
        self.preprocess = Preprocessor(base, models, keep=())

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
        out: dict[str, Any] = {k: batch[k] for k in CARRIED if k in batch}
        # A plain fixed-size list column: readable by pandas, DuckDB, Spark, not only Ray.
        out["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])
        for i, name in enumerate(self.attributes):
            out[PREDICTED_PREFIX + name] = predicted[:, i].astype(np.float32)
        return pa.table(out)
