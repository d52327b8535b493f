"""Retrieval over the lesion gallery, without Serve: what the Retrieval deployment runs per request.

    retriever = Retriever(cfg.serve, cfg.models, cfg.storage_options)
    retriever.search_image(jpeg_bytes, k=10)       # grounded embedding -> vector index
    retriever.search_attribute(jpeg_bytes, "area_mm2", k=10)
    retriever.search_text("raised pink nodule ...", k=10)
    retriever.predict(jpeg_bytes)                  # attributes (grounded heads) + diagnosis (classifier)

Search by image and by attribute use the grounded model and the index jobs.embeddings built
with it. Search by note text cannot use that index: the grounded embedding has never seen
text. The image + note classifier (jobs.classifier) was trained with a CLIP loss that puts
its image projection and its note projection in one 128-d space, so text search embeds the
note with the frozen text encoder, projects it with the classifier's text projection, and
searches the gallery's classifier image projections (which the classifier job indexed). The
same classifier's image head predicts the diagnosis.

Nothing here grows with the gallery's images: a replica loads the indexes and the gallery's
metadata, and reads each thumbnail from storage when a response shows it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dermaray.config import ModelsConfig, ServeConfig
from dermaray.grounding.classifier import SETTINGS_FILE as CLASSIFIER_FILE
from dermaray.grounding.embed import PREDICTED_PREFIX, LesionEmbedder, require_index_of
from dermaray.retrieval import VectorIndex
from dermaray.schema import DIAGNOSES_BY_CODE
from dermaray.serving.checks import RequestError, check_k, check_text, decode_upload
from dermaray.serving.gallery import LESION_COLUMNS, Gallery, attribute_dict, diagnosis_name
from dermaray.serving.thumbnails import Thumbnails
from dermaray.storage import present, read_parquet

log = logging.getLogger(__name__)


class Retriever:
    def __init__(self, settings: ServeConfig, models: ModelsConfig, storage_options: dict | None = None):
        options = storage_options or {}
        self.settings = settings
        self.embedder = LesionEmbedder(settings.grounding_model, models.grounding_mllm, models, options)
        self.processor = self.embedder.preprocess.processor
        self.index = VectorIndex.load(settings.index, options)
        require_index_of(self.index.meta, self.embedder.identity, settings.index)
        lesions = read_parquet(settings.lesions, options, columns=LESION_COLUMNS)
        predicted = [PREDICTED_PREFIX + n for n in self.embedder.attributes]
        embeddings = read_parquet(settings.embeddings, options, columns=["lesion_id", *predicted])
        thumbnails = None
        if settings.thumbnails and present(settings.thumbnails, "meta.json", options):
            try:
                thumbnails = Thumbnails(settings.thumbnails, self.index.ids, options, settings.thumbnail_cache)
            except ValueError as exc:  # another gallery's: showing them would put other lesions' pictures on hits
                log.warning("%s: responses show no thumbnails", exc)
        elif settings.thumbnails:
            log.warning("serve.thumbnails %s holds no thumbnails: responses show none", settings.thumbnails)
        self.gallery = Gallery.build(self.index.ids, lesions, embeddings, self.embedder.attributes, thumbnails)
        self.classifier = self.text_encoder = self.text_index = None
        self.no_text_search = "text search needs the classifier checkpoint, which this deployment was not given"
        if settings.classifier and not present(settings.classifier, CLASSIFIER_FILE, options):
            # An optional part: search by image and attribute still work without it.
            log.warning("serve.classifier %s holds no classifier: no diagnosis prediction or text search", settings.classifier)
        elif settings.classifier:
            self._load_classifier(settings.classifier, models, options)

    def _load_classifier(self, uri: str, models: ModelsConfig, options: dict) -> None:
        from dermaray.grounding.classifier import ImageProjector
        from dermaray.grounding.text import TextEncoder

        self.device = self.embedder.device
        self.projector = ImageProjector(uri, models, options, device=str(self.device))
        self.classifier = self.projector.classifier
        self.text_encoder = TextEncoder(self.classifier.settings.text_encoder, models, device=str(self.device))
        self._load_text_index(self.projector.weights, options)

    def _load_text_index(self, weights: str, options: dict) -> None:
        """The classifier job's index of its image projections, if it is this classifier's and covers exactly the
        gallery; else text search answers 503 with the reason (diagnosis prediction still works)."""
        uri = self.settings.text_index
        if not uri or not present(uri, "meta.json", options):
            where = f"serve.text_index {uri} holds none" if uri else "serve.text_index is not set"
            self.no_text_search = f"text search needs the classifier's image projections, and {where}"
        else:
            index = VectorIndex.load(uri, options)
            missing = len(set(self.gallery.ids).difference(index.ids))
            if index.meta.get("model_weights") != weights:
                self.no_text_search = f"serve.text_index {uri} was made by another classifier than serve.classifier's"
            elif missing or len(index) != len(self.gallery):
                self.no_text_search = (
                    f"serve.text_index {uri} projects {len(index)} lesions, of which {len(self.gallery) - missing} are in "
                    f"the gallery of {len(self.gallery)}: run the classifier job on the gallery's lesion table"
                )
            else:
                self.text_index = index
        if self.text_index is None:
            log.warning("%s: text search answers 503", self.no_text_search)

    # -- model calls -------------------------------------------------------------------

    def decode(self, data: bytes):
        return decode_upload(data, self.settings.max_upload_bytes, self.settings.max_image_pixels)

    def embed(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """Grounded unit embeddings [B, D] and predicted attributes [B, A] (native units)."""
        pixels = self.processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
        z, predicted = self.embedder.embed_pixels(pixels)
        return z, predicted if predicted is not None else np.zeros((len(images), 0))

    @torch.no_grad()
    def _classify(self, images: list) -> list[dict[str, Any] | None]:
        """Per image: the classifier's class, its probability and every class's (None without a classifier)."""
        if self.classifier is None:
            return [None] * len(images)
        features = torch.as_tensor(self.projector.project(images), device=self.device)
        probabilities = torch.softmax(self.classifier.image_head(features), dim=-1).cpu().numpy()
        classes = self.classifier.settings.classes
        out = []
        for p in probabilities:
            best = int(p.argmax())
            out.append(
                {
                    "class": classes[best],
                    "probability": round(float(p[best]), 4),
                    "probabilities": {c: round(float(v), 4) for c, v in zip(classes, p, strict=True)},
                }
            )
        return out

    # -- requests ------------------------------------------------------------------------

    def query_summary(self, images: list) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(embeddings, per image: predicted attributes, and the classifier's prediction: as `diagnosis` from a
        classifier of diagnoses, as `prediction` (with its `label`: superclass or malignant) from any other)."""
        z, predicted = self.embed(images)
        label = self.classifier.settings.label if self.classifier is not None else None
        out = []
        for p, c in zip(predicted, self._classify(images), strict=True):
            diagnosis = prediction = None
            if c is not None and label == "diagnosis":
                diagnosis = {
                    "code": c["class"],
                    "name": diagnosis_name(c["class"]),
                    "probability": c["probability"],
                    "probabilities": c["probabilities"],
                }
            elif c is not None:
                prediction = {"label": label, **c}
            out.append(
                {"attributes": attribute_dict(self.embedder.attributes, p), "diagnosis": diagnosis, "prediction": prediction}
            )
        return z, out

    def search_batch(self, uploads: list[bytes], ks: list[int], thumbnails: list[bool]) -> list[dict[str, Any] | RequestError]:
        """Per upload: its predicted attributes and diagnosis and its k most similar gallery lesions,
        or the RequestError that refused it (one bad upload does not fail the others).

        The accepted uploads go through the model as one batch (the deployment batches requests).
        """
        out: list[Any] = [None] * len(uploads)
        images, accepted = [], []
        for i, (upload, k) in enumerate(zip(uploads, ks, strict=True)):
            try:
                check_k(k, self.settings.max_k)
                images.append(self.decode(upload))
                accepted.append(i)
            except RequestError as refused:
                out[i] = refused
        if images:
            z, queries = self.query_summary(images)
            scores, rows = self.index.search(z, max(ks[i] for i in accepted))
            for j, i in enumerate(accepted):
                hits = [(r, s) for r, s in zip(rows[j, : ks[i]].tolist(), scores[j, : ks[i]].tolist(), strict=True) if r >= 0]
                out[i] = {"query": queries[j], "results": self.gallery.records(hits, thumbnails[i])}
        return out

    def search_image(self, upload: bytes, k: int, thumbnails: bool = False) -> dict[str, Any]:
        [result] = self.search_batch([upload], [k], [thumbnails])
        if isinstance(result, RequestError):
            raise result
        return result

    def search_attribute(self, upload: bytes, attribute: str, k: int, thumbnails: bool = False) -> dict[str, Any]:
        """The k gallery lesions whose predicted `attribute` is closest to the upload's."""
        check_k(k, self.settings.max_k)
        if attribute not in self.gallery.predicted_names:
            raise RequestError(
                422, f"attribute must be one of the grounded attributes: {', '.join(self.gallery.predicted_names)}"
            )
        _, [query] = self.query_summary([self.decode(upload)])
        value = query["attributes"][attribute]
        results = []
        nearest = self.gallery.nearest_by_value(attribute, value, k)
        for (row, gap), record in zip(nearest, self.gallery.records([(r, None) for r, _ in nearest], thumbnails), strict=True):
            record["predicted_" + attribute] = round(
                float(self.gallery.predicted[row, self.gallery.predicted_names.index(attribute)]), 4
            )
            record["difference"] = round(gap, 6)
            results.append(record)
        return {"query": query, "attribute": attribute, "results": results}

    def search_text(self, text: str, k: int, thumbnails: bool = False) -> dict[str, Any]:
        check_k(k, self.settings.max_k)
        text = check_text(text, self.settings.max_text_chars)
        if self.text_index is None:
            raise RequestError(503, self.no_text_search)
        with torch.no_grad():
            note = torch.as_tensor(self.text_encoder.encode([text]), device=self.device)
            query = self.classifier.encode_text(note).cpu().numpy()
        [hits] = self.text_index.search_ids(query, k)
        return {"results": self.gallery.records([(self.gallery.row_of(i), s) for i, s in hits], thumbnails)}

    def predict(self, upload: bytes) -> dict[str, Any]:
        _, [query] = self.query_summary([self.decode(upload)])
        return query

    def lesion(self, lesion_id: str, thumbnails: bool = False) -> dict[str, Any]:
        row = self.gallery.row_of(lesion_id)
        if row is None:
            raise RequestError(404, "no lesion with that id in the gallery")
        return self.gallery.record(row, None, thumbnails)

    def thumbnail(self, lesion_id: str) -> bytes:
        row = self.gallery.row_of(lesion_id)
        if row is None:
            raise RequestError(404, "no lesion with that id in the gallery")
        jpeg = self.gallery.thumbnail(row)
        if jpeg is None:
            raise RequestError(404, "the gallery has no thumbnail of that lesion")
        return jpeg

    def info(self) -> dict[str, Any]:
        from dermaray.serving.status import public_model

        model = self.index.meta.get("model")  # the encoder folder the index was built with: no server paths
        index = {**self.index.meta, "model": public_model(model) if isinstance(model, str) else model}
        return {
            "lesions": len(self.gallery),
            "index": index,
            "grounded_attributes": self.gallery.predicted_names,
            "diagnoses": {c: d.name for c, d in DIAGNOSES_BY_CODE.items()},
            "text_search": self.text_index is not None,
            "thumbnails": self.gallery.thumbnails is not None,
            "max_k": self.settings.max_k,
        }
