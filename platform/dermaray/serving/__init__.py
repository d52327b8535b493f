"""Serving cores for the Ray Serve apps (serve/app.py): request checks, the lesion gallery,
retrieval by image / attribute / note text, and the per-diagnosis LoRA adapter bank."""
