"""Model presets per role (note_writer, grounding_mllm, text_encoder, diffusion_base) and their resolution."""

from dermaray.models.registry import PRESETS, ROLES, ModelPreset, list_presets, resolve_model

__all__ = ["PRESETS", "ROLES", "ModelPreset", "list_presets", "resolve_model"]
