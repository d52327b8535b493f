"""Vector retrieval: build, save, load and search faiss indexes of lesion embeddings by lesion id."""

from dermaray.retrieval.index import IndexKind, VectorIndex

__all__ = ["IndexKind", "VectorIndex"]
