"""Grounded image-text embeddings: models, training and evaluation."""
