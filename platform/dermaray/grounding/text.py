"""Note text -> unit-norm sentence embeddings with the registry's text encoder (frozen).

Mean pooling over tokens (all-MiniLM-L6-v2's recipe, and the tiny preset's); BGE uses its
CLS token. The classifier trains a projection on top; the Serve app embeds queries with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dermaray.config import ModelsConfig

CLS_POOLED = {"bge-base"}  # presets whose sentence embedding is the CLS token


class TextEncoder:
    def __init__(self, model: str, models: ModelsConfig, device: str | None = None, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        from dermaray.models.registry import resolve_model

        path = resolve_model("text_encoder", model, models)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.pooling = "cls" if model in CLS_POOLED else "mean"
        self.max_length = max_length
        self.model_id = model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32)
