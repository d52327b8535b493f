"""Typed configuration: pydantic models, loaded from YAML, with `key=value` overrides.

    cfg = load_config("configs/local.yaml", ["ingest.input=s3://bucket/isic", "synth.n_lesions=500"])

An override's value is parsed as YAML (`3` is an int, `[a, b]` a list, `null` None), and
unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermaray.diffusion import denoising_steps
from dermaray.layout import DEFAULT_WORKDIR, MAIN_DOMAIN, Layout, embeddings_index, embeddings_table, embeddings_thumbnails

_OUT = Layout(DEFAULT_WORKDIR)  # where `make run` writes: serve.* defaults point into it


# The pipeline's stages, in the order it runs them.
Stage = Literal[
    "synth", "ingest", "notes", "grounding", "embeddings", "grounding_eval", "classifier", "diffusion", "diffusion_eval", "report"
]
STAGES: tuple[Stage, ...] = get_args(Stage)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = None  # None: start a local cluster; "auto": join the running one
    num_cpus: int | None = None  # for a local cluster only
    log_to_driver: bool = True


# Option names that carry a credential. Credentials never sit in a config: a config travels in task
# and actor arguments and in Ray Train's run state, which the dashboard serves.
CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "account_key",
        "sas_token",
        "client_secret",
    }
)
SECRETS_FILE_KEY = "secrets_file"  # storage option: a YAML/JSON file of credentials, read on the node that uses it


def refuse_credentials(options: dict[str, Any], where: str) -> dict[str, Any]:
    """`options` unchanged, or an error naming the credential keys found at any depth."""

    def found(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        return [f"{prefix}{k}" for k in node if str(k).lower() in CREDENTIAL_KEYS] + [
            name for k, v in node.items() for name in found(v, f"{prefix}{k}.")
        ]

    keys = found(options, f"{where}.")
    if keys:
        raise ValueError(
            f"{', '.join(keys)}: credentials do not go in a config (it travels in task arguments and Ray Train's run "
            f"state). Use the standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance role, a profile) "
            f"or name a credentials file: {where}.{SECRETS_FILE_KEY}: /path/on/every/node.yaml"
        )
    return options


class ModelsConfig(Section):
    # Each node's model cache: tiny builds and hub snapshots, fetched once per node. A relative path is
    # made absolute where the config is loaded; `~` expands on each node.
    cache_dir: str = Field(default_factory=lambda: os.environ.get("DERMARAY_MODEL_CACHE", ".cache/models"))
    offline: bool = True  # never reach a model hub: only the cache, the store and offline builds
    store: str | None = None  # an object-storage mirror of hub snapshots (`dermaray models push`); nodes pull from it
    store_options: dict[str, Any] = {}  # fsspec options for `store` (endpoint_url, ...; no credentials)
    note_writer: str = "tiny"
    grounding_mllm: str = "tiny"
    text_encoder: str = "minilm"
    diffusion_base: str = "tiny"

    @field_validator("store_options")
    @classmethod
    def _no_store_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        return refuse_credentials(value, "models.store_options")


class CorruptionPlan(Section):
    """Bad rows the synthetic generator plants, so ingest's quarantine can be checked."""

    truncated_image: int = 0
    not_an_image: int = 0
    decompression_bomb: int = 0
    empty_image: int = 0
    image_missing: int = 0  # metadata row whose id is absent from the HDF5
    nan_attribute: int = 0
    negative_attribute: int = 0
    wrong_dtype: int = 0
    duplicate_id: int = 0

    @property
    def total(self) -> int:
        return sum(self.model_dump().values())


class SynthConfig(Section):
    output: str = "out/synthetic/isic"
    n_lesions: int = Field(default=2000, ge=1)
    lesions_per_patient: float = Field(default=4.0, gt=0)
    seed: int = 0
    domain: Literal["clinic", "shifted"] = "clinic"  # "shifted": other skin tones, lighting, resolution
    image_size: int | None = None  # pixels per side; None: the domain's default
    jpeg_quality: int = Field(default=90, ge=10, le=100)
    class_weights: dict[str, float] | None = None  # None: every class in equal share
    # Share of rows with only iddx_1 and `target` (no finer diagnosis), as most real ISIC 2024 rows.
    unlabelled_fraction: float = Field(default=0.0, ge=0, le=1)
    shard_size: int = Field(default=256, ge=1)  # lesions rendered per Ray task
    corrupt: CorruptionPlan = CorruptionPlan()


class IngestConfig(Section):
    source: Literal["isic2024", "ham10000", "pad_ufes_20", "parquet"] = "isic2024"
    input: str = "out/synthetic/isic"
    output: str = "out/ingest"  # writes <output>/lesions and <output>/quarantine
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_image_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test, by patient
    # Most lesions per task and so per Parquet file of each output table: a task holds its rows (images included)
    # until it writes them, and a reader of the table a file at a time, so this bounds their memory (1,024 x a
    # 128 px tile: ~4 MB; x a 600 x 450 photograph: ~80 MB). Larger batches spend less time between tasks (~10 ms
    # each, a tenth of a 512-row task of 128 px tiles on 2 loaded cores); the job takes fewer rows a task (not under
    # 128) where a small source would otherwise leave a CPU idle at the end (`jobs.ingest.rows_per_task`).
    batch_size: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> IngestConfig:
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")
        return self


class SamplingConfig(Section):
    """vLLM SamplingParams for note writing (the method: temperature 0.1-0.2, ~200 tokens)."""

    temperature: float = Field(default=0.2, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=200, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0)  # vLLM's: above 1 discourages repeating tokens (small models loop)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    seed: int | None = 0  # the engine's seed: a re-run of the same shard writes the same notes


class NotesConfig(Section):
    input: str = "out/ingest/clinic/lesions"
    output: str = "out/notes/clinic"
    strategy: Literal["M", "P1", "P2", "P3", "LF"] = "P2"  # LF: label-free (demographics, site, attributes)
    # Which metadata goes into the prompt (P3 takes none by definition).
    label_hierarchy: bool = True
    demographics_site: bool = True
    attributes: bool = True
    with_image: bool = False  # image in the prompt: needs an image-capable preset (GPU vLLM)
    sampling: SamplingConfig = SamplingConfig()
    max_model_len: int = Field(default=2048, ge=64)
    # "auto": bfloat16 on a GPU or a CPU with AVX-512 BF16 / AMX, float32 on other CPUs (chosen at engine start)
    dtype: str = "auto"
    # None: eager on CPU (vLLM's CPU backend), CUDA graphs on a GPU (several times faster decoding).
    enforce_eager: bool | None = None
    engine_kwargs: dict[str, Any] = {}  # more vllm.LLM arguments (tensor_parallel_size, gpu_memory_utilization, ...)
    # Environment of the engine process, set before it starts; the defaults make vLLM run on a small CPU.
    # OMP_NUM_THREADS=1 is vLLM's own choice for serving on CPU; Ray would otherwise set it to the actor's
    # num_cpus, and two spin-waiting torch threads made the engine actor ~1.5x slower than in-process here.
    engine_env: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    concurrency: int = Field(default=1, ge=1)  # engine actors: one per GPU; on CPU nodes one per core (a CPU engine uses one)
    num_gpus: float = Field(default=0, ge=0)  # per engine actor
    num_cpus: float = Field(default=1, ge=0)  # per engine actor
    resources: dict[str, float] = {}  # custom resources per engine actor, e.g. {"inference": 1}
    batch_size: int = Field(default=256, ge=1)  # prompts per generate call (vLLM batches within it)
    shard_size: int = Field(default=256, ge=1)  # lesions per output file: the unit of resume
    limit: int | None = Field(default=None, ge=1)  # only the first N lesions (by id), for trials
    # The model writes the notes of this many lesions (the test split first, then by id); the others get
    # the template note with the same metadata (strategy M). None: the model writes every note.
    model_lesions: int | None = Field(default=None, ge=0)


class TrainConfig(Section):
    """Ray Train settings shared by the training jobs."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    batch_size: int = Field(default=64, ge=1)  # per worker
    epochs: int = Field(default=10, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    seed: int = 0
    max_failures: int = Field(default=2, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    # Custom resources each worker asks for, e.g. {"training": 1} to land on cluster.yaml's training nodes.
    resources: dict[str, float] = {}
    # Also checkpoint every N optimizer steps inside an epoch (None: at epoch ends only); a resume
    # from such a checkpoint skips the batches of the epoch already trained on.
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    # Validate and checkpoint every N epochs and after the last one (1: every epoch). The epochs between report
    # their training metrics only, and a resume goes back to the last checkpoint. Short epochs (a diffusion
    # adapter's few seconds) spend a large share of their time on the report otherwise.
    checkpoint_every_epochs: int = Field(default=1, ge=1)
    # Keep the prepared inputs in the object store across epochs, every split (the classifier's test split
    # too) prepared in one pass: small datasets. false: each split streams, read as training pulls it.
    materialize: bool = True
    # "auto": bf16-mixed on a GPU with bfloat16 (fp16-mixed on older GPUs), fp32 on CPU. Mixed precision
    # autocasts forward passes and keeps frozen weights in the compute dtype, trainable ones in float32.
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = "auto"
    max_grad_norm: float | None = Field(default=None, gt=0)  # clip the global gradient norm (None: no clipping)
    grad_accumulation: int = Field(default=1, ge=1)  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more compute


GROUNDED_ATTRIBUTES = [
    "area_mm2",
    "perimeter_mm",
    "minor_axis_mm",
    "eccentricity",
    "area_perim_ratio",
    "color_std_mean",
    "delta_lb_norm",
    "symm_2axis",
    "norm_border",
    "norm_color",
]


class GroundingSpec(Section):
    """What defines a grounding model besides its base model and weights: the grounding section sets it,
    every checkpoint saves it (dermaray.grounding.model.GroundingSettings adds the base model)."""

    attributes: list[str] = Field(default_factory=lambda: list(GROUNDED_ATTRIBUTES))
    tune: Literal["frozen", "projector", "lora", "full"] = "lora"  # what trains besides the heads
    # The side (px) images are resized to for the tower; None: its processor's (64 for the tiny tower, 336 for
    # LLaVA-1.5). Another size interpolates the tower's position embeddings, as ViTs are fine-tuned at new sizes.
    image_size: int | None = Field(default=None, ge=16, le=1024)
    # The tower's hidden layer the embedding reads (LLaVA's vision_feature_layer: -2, the penultimate, for LLaVA-1.5;
    # 0 is the patch embeddings); None: the base model's own. The frozen baseline always reads the base's own.
    feature_layer: int | None = None
    # What the attribute heads read: the embedding, or its direction (the embedding L2-normalised, scaled by
    # sqrt(dim)), the geometry the cosine index searches, so an attribute the heads read is one retrieval sees.
    heads_read: Literal["embedding", "direction"] = "embedding"
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_targets: list[str] = ["q_proj", "v_proj"]


class GroundingConfig(GroundingSpec):
    input: str = "out/ingest/clinic/lesions"
    # More lesion tables (another clinic's) whose train and val splits train alongside input's: mixed-clinic
    # training. The attribute scaler is fitted on every table's train split.
    mixed_inputs: list[str] = []
    output: str = "out/grounding"  # Ray Train runs under <output>/runs; the final model in <output>/model
    run_name: str = "grounding"  # re-running with the same name resumes from its last checkpoint
    attribute_weights: dict[str, float] = {}  # loss weight per attribute (default 1)
    log_sizes: bool = True  # learn lengths and areas on a log scale
    # Also photometric views (skin tone, contrast, lighting, noise, resolution), each attribute trained only on
    # the views that keep its value (dermaray.grounding.photometric): robustness to another clinic's images.
    photometric: bool = True
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _each_table_once(self) -> GroundingConfig:
        tables = [self.input, *self.mixed_inputs]
        if len(set(tables)) < len(tables):
            raise ValueError(f"grounding.input and grounding.mixed_inputs name a table twice (its lesions count twice): {tables}")
        return self

    @model_validator(mode="after")
    def _weights_of_grounded_attributes(self) -> GroundingConfig:
        # A weight for an attribute not grounded (a typo, or one left out of `attributes`) would weigh nothing.
        stray = sorted(set(self.attribute_weights) - set(self.attributes))
        if stray:
            raise ValueError(f"grounding.attribute_weights names {stray}, not among grounding.attributes {self.attributes}")
        if any(w < 0 for w in self.attribute_weights.values()):
            raise ValueError(f"grounding.attribute_weights must be >= 0, got {self.attribute_weights}")
        return self


class IndexConfig(Section):
    kind: Literal["exact", "ivf", "hnsw"] = "exact"  # exact up to ~1e5 lesions; ivf beyond
    nlist: int | None = None  # ivf lists; None: about 4 sqrt(n)
    nprobe: int = Field(default=16, ge=1)


class EmbeddingsConfig(Section):
    input: str = "out/ingest/clinic/lesions"
    output: str = "out/embeddings/clinic"  # <output>/embeddings (Parquet) and <output>/index
    model: str = "out/grounding/model"  # a grounding model folder (any URI), or "frozen": the untuned base
    batch_size: int = Field(default=256, ge=1)
    concurrency: int = Field(default=1, ge=1)  # embedding actors
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    resources: dict[str, float] = {}  # custom resources per actor, e.g. {"inference": 1}
    index: IndexConfig | None = IndexConfig()  # None: embeddings only
    # Each lesion's thumbnail (longest side, px) in the table and in <output>/thumbnails, in the index's row
    # order, where the Serve replicas read them one at a time; None: no thumbnails.
    thumbnail_px: int | None = Field(default=96, ge=16, le=512)


class GroundingEvalConfig(Section):
    """Frozen vs grounded: both embeddings tables per domain, as jobs.embeddings wrote them."""

    frozen: str = "out/embeddings/frozen"  # <frozen>/<domain>/embeddings
    grounded: str = "out/embeddings/grounded"
    domains: list[str] = ["clinic", "shifted"]  # the first: its test split; the others: every lesion, unless trained_on
    # Domains after the first that the grounded model also trained on (grounding.mixed_inputs): their test split only.
    trained_on: list[str] = []
    output: str = "out/reports/grounding"
    tau_std: float = Field(default=0.1, gt=0)  # relevance: |delta attribute| <= tau_std x its spread
    # Retrieval is scored from this many queries per set (a seeded sample; None: every lesion) against the whole set.
    max_queries: int | None = Field(default=2000, ge=1)
    max_probe_lesions: int | None = Field(default=20000, ge=1)  # training lesions the frozen probe is fitted on
    seed: int = 0  # chooses the query sample and the probe's training sample


class ClassifierConfig(Section):
    """Image + note classifier. Notes must be written without the label, or the note gives the class away."""

    input: str = "out/ingest/clinic/lesions"
    notes: str = "out/notes_blind/clinic"
    shifted_input: str | None = "out/ingest/shifted/lesions"  # evaluated too, when given
    shifted_notes: str | None = "out/notes_blind/shifted"
    output: str = "out/classifier"
    run_name: str = "classifier"
    init_from: str | None = "out/grounding/model"  # start the image tower from a grounded model; None: the base
    projection_dim: int = Field(default=128, ge=8)
    tune_image: bool = True
    allow_labelled_notes: bool = False  # only for ablations: notes that state the diagnosis leak the label
    # What the heads predict: diagnosis (MEL, NEV, ...), superclass (ISIC's iddx_1) or malignant (ISIC's
    # target; reported with the ISIC 2024 challenge's partial AUC). Lesions without it are left out of
    # training and evaluation and counted (excluded_unlabelled).
    label: Literal["diagnosis", "superclass", "malignant"] = "diagnosis"
    # "balanced": cross-entropy weight n / (classes x n_class) per class from the training split, for a
    # rare class (ISIC 2024's malignant lesions are about 0.1%); "none": equal weights.
    class_weights: Literal["none", "balanced"] = "none"
    train: TrainConfig = TrainConfig()


class BasePretrainConfig(Section):
    """Pre-training of a random tiny base so LoRA adapts something that makes images: the VAE first,
    then the UNet on the VAE's cached latents (as Stable Diffusion was trained)."""

    vae_steps: int = Field(default=300, ge=0)
    unet_steps: int = Field(default=2000, ge=0)  # both 0: use the base as it is
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    max_images: int = Field(default=2000, ge=1)  # training-split images it sees
    # Steps of an IP-Adapter trained on the pre-trained base (UNet frozen; a tiny random CLIP image encoder reads
    # each image), saved in <base>/ip_adapter: image prompts for every adapter of this base. 0: none.
    ip_adapter_steps: int = Field(default=0, ge=0)
    # "generic": captions without the diagnosis ("a dermoscopic photo of large lesion"), so the base
    # knows lesions but not diagnoses, like a general-purpose base; "diagnosis": the class captions
    # the adapters use (the base then already draws classes and the adapters have little to add).
    captions: Literal["generic", "diagnosis"] = "generic"
    # The UNet trained on a noise schedule that ends in pure noise, predicting velocity, and sampled from its last
    # step (dermaray.diffusion.pipeline.zero_terminal_snr_scheduler; Lin et al. 2024), as the base's scheduler
    # config then says to every adapter and generation. False: SD 1.5's schedule, epsilon-prediction. In a one-process
    # pair (README, Results) cleaner images and sizes, the same class relevance (0.273 against 0.266): off.
    zero_terminal_snr: bool = False

    @model_validator(mode="after")
    def _schedule_needs_unet_steps(self) -> BasePretrainConfig:
        if self.zero_terminal_snr and not self.unet_steps:
            raise ValueError("zero_terminal_snr needs unet_steps > 0: a UNet trained on another schedule cannot sample with it")
        return self


class DiffusionConfig(Section):
    input: str = "out/ingest/clinic/lesions"
    output: str = "out/diffusion"  # <output>/base (pre-trained tiny base), <output>/runs, <output>/adapter
    resolution: int | None = None  # training / generation size; None: the base's native size
    size_words: bool = True  # captions say small / medium / large from the lesion's long diameter, as its note does
    notes: str | None = None  # a notes Parquet (jobs.notes): each lesion's note follows its training caption
    pretrain: BasePretrainConfig = BasePretrainConfig()  # only for `tiny` (random) bases
    # Share of training captions replaced by the empty one (base and adapters), so the UNet also learns
    # the unconditional prediction that classifier-free guidance (diffusion_eval.guidance_scale) needs.
    caption_dropout: float = Field(default=0.1, ge=0, lt=1)
    snr_gamma: float | None = Field(default=5.0, gt=0)  # Min-SNR-gamma loss weighting; None: plain MSE
    # Training noise gets one value x noise_offset per image and channel (diffusers' `--noise_offset`; base and
    # adapters): lets the model set an image's overall colour from its caption, which a diagnosis largely is. 0.1
    # lifted the adapters' class relevance in a one-process pair, but not in the study (0.266 against 0.289; README,
    # Results), and it lifted the diagnosis-free base's: off.
    noise_offset: float = Field(default=0.0, ge=0, le=1)
    run_name: str = "lora"
    limit: int | None = Field(default=None, ge=1)  # only the first N lesions (by id) of each split, for trials
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=8, ge=1)
    # The UNet layers adapted: attention (diffusers' LoRA scripts' choice), or its blocks' every linear and convolution
    # layer (dermaray.diffusion.pipeline.LORA_TARGETS_ALL_LAYERS, what benchmarks/study.py trains: colour needs them).
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    # "shared": one adapter for every diagnosis, conditioned by the class caption (<output>/adapter);
    # "per_diagnosis": one adapter per diagnosis trained on that diagnosis' lesions
    # (<output>/adapters/<code>), what the generation deployment multiplexes.
    adapters: Literal["shared", "per_diagnosis"] = "shared"
    diagnoses: list[str] | None = None  # per_diagnosis: adapters for these codes only (None: every one trained on)
    # per_diagnosis: an adapter only for a diagnosis with at least this many training lesions (the rest are
    # listed as skipped in the summary). Lesions without a diagnosis train no adapter, shared or not, and are counted.
    min_lesions: int = Field(default=8, ge=1)
    train: TrainConfig = TrainConfig(lr=1e-4, epochs=5, batch_size=16)


class DiffusionEvalConfig(Section):
    """Base vs LoRA generation, judged by the image head of the classifier trained on real lesions."""

    base: str | None = None  # None: <diffusion.output>/base
    adapter: str | None = None  # None: <diffusion.output>/adapter
    classifier: str = "out/classifier/model"
    real: str = "out/ingest/clinic/lesions"  # its test split: the held-out real images for KID
    real_images: int = Field(default=500, ge=2)
    output: str = "out/reports/diffusion"
    images_per_class: int = Field(default=16, ge=2)
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=7.5, ge=1)
    # Image-guided references (img2img from a held-out lesion with its diagnosis' adapter), scored against
    # the guide; the share of the denoising redone (0: the guide itself, 1: text only). None: not evaluated.
    guide_strength: float | None = Field(default=0.6, gt=0, le=1)
    # Further strengths scored as guide_strength is (class relevance, following the guide, pixel change from it),
    # a table of what following the guide more closely costs; the grid and the headline row stay guide_strength's.
    guide_sweep: list[float] = []
    # Image-guided references through an IP-Adapter (the guide as an image prompt to the diagnosis' LoRA), scored as
    # guide_strength is, at each of ip_adapter_scales, from noise and with img2img at guide_strength. None: the base's
    # own (<base>/ip_adapter), when it has one.
    ip_adapter: str | None = None
    ip_adapter_scales: list[float] = [1.0]
    seed: int = 0
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _sweep_is_of_strengths(self) -> DiffusionEvalConfig:
        if self.guide_sweep and self.guide_strength is None:
            raise ValueError("guide_sweep scores image-guided generation: it needs guide_strength, not null")
        if not all(0 < s <= 1 for s in self.guide_sweep):
            raise ValueError(f"guide_sweep holds strengths in (0, 1], got {self.guide_sweep}")
        if self.ip_adapter is not None and self.guide_strength is None:
            raise ValueError("diffusion_eval.ip_adapter scores image-guided generation: it needs guide_strength, not null")
        if any(scale <= 0 for scale in self.ip_adapter_scales):
            raise ValueError(f"ip_adapter_scales are positive, got {self.ip_adapter_scales}")
        weakest = min([*self.guide_sweep, self.guide_strength or 1])
        if denoising_steps(self.steps, weakest) < 1:
            raise ValueError(f"guide strength {weakest} of {self.steps} steps leaves no denoising step")
        return self


class ReportConfig(Section):
    """The HTML report: one self-contained file (images inlined) from what the stages wrote under `workdir`."""

    workdir: str = DEFAULT_WORKDIR  # a pipeline workdir (local or s3://); stages not found there show as "not run"
    output: str | None = None  # None: <workdir>/reports/report.html
    gallery_queries: int = Field(default=4, ge=0)  # held-out query lesions in the retrieval gallery
    gallery_k: int = Field(default=5, ge=1)  # neighbours shown per query
    thumbnail_px: int = Field(default=80, ge=16)
    sample_notes: int = Field(default=3, ge=0)  # notes shown as written, per notes output


class PipelineConfig(Section):
    """The end-to-end job: every stage reads what the one before wrote under `workdir`."""

    workdir: str = DEFAULT_WORKDIR
    shifted_lesions: int = Field(default=400, ge=0)  # a domain-shift test set; 0 to skip
    # Grounding also trains on the shifted clinic's train and val splits (mixed clinics); grounding_eval then scores
    # that clinic on its test split. The classifier, started from the grounded tower, still scores every shifted
    # lesion: its tower then saw the images of the train and val splits (their attributes, not their diagnoses).
    mixed_clinics: bool = False
    # notes.model_lesions for the shifted clinic's notes (None: the same as the clinic's; 0: templates only)
    shifted_model_lesions: int | None = Field(default=None, ge=0)
    stages: list[Stage] = list(STAGES)
    # Skip a stage whose outputs are complete for the same settings and inputs (dermaray.completion);
    # false: delete every selected stage's outputs and run it from scratch.
    resume: bool = True

    @model_validator(mode="after")
    def _mixed_needs_a_second_clinic(self) -> PipelineConfig:
        if self.mixed_clinics and not self.shifted_lesions:
            raise ValueError("pipeline.mixed_clinics needs the shifted clinic: set pipeline.shifted_lesions > 0")
        return self


class ServeConfig(Section):
    """The Ray Serve apps (serve/app.py): the artifacts they load (any URI) and the limits they enforce."""

    grounding_model: str = _OUT.grounding_model  # image -> embedding + predicted attributes
    index: str = embeddings_index(_OUT.embeddings("grounded", MAIN_DOMAIN))  # the vector index over that model's embeddings
    embeddings: str = embeddings_table(
        _OUT.embeddings("grounded", MAIN_DOMAIN)
    )  # gallery's predicted attributes (attribute search)
    lesions: str = _OUT.lesions(MAIN_DOMAIN)  # gallery metadata (its images are not read)
    # The gallery's thumbnails, written by the embeddings job beside the index; None: responses without thumbnails.
    thumbnails: str | None = embeddings_thumbnails(_OUT.embeddings("grounded", MAIN_DOMAIN))
    thumbnail_cache: int = Field(default=4096, ge=0)  # thumbnails a replica keeps in memory (LRU)
    classifier: str | None = _OUT.classifier_model  # diagnosis prediction and text search; None: neither
    # The classifier's image projections of the gallery (written by the classifier job): what text search searches
    text_index: str | None = _OUT.classifier_projections
    diffusion: str | None = _OUT.diffusion  # <diffusion>/base, /adapter, /adapters/<code>; None: no generation
    max_upload_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)  # larger uploads: 413
    max_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64)  # more decoded pixels (a decompression bomb): 422
    max_k: int = Field(default=50, ge=1, le=100)  # similar lesions per request
    max_text_chars: int = Field(default=4000, ge=1)
    max_images: int = Field(default=4, ge=1, le=16)  # generated references per request
    steps: int = Field(default=20, ge=1)  # denoising steps per generated image
    # At most 500: SD's DDIM schedule (1000 training steps, steps_offset 1) indexes past its end near 1000 steps.
    max_steps: int = Field(default=50, ge=1, le=500)
    guidance_scale: float = Field(default=7.5, ge=1)
    resolution: int | None = Field(default=None, ge=8)  # None: diffusion.resolution, else the base's native size
    # What /chain's references are generated from (its `guide` parameter overrides): "upload" (img2img from the
    # uploaded lesion, so they resemble the case at hand), "similar" (from the best-matching case's thumbnail)
    # or "none" (the diagnosis' caption alone); `guide_strength`: the share of the denoising redone.
    chain_guide: Literal["none", "upload", "similar"] = "upload"
    guide_strength: float = Field(default=0.6, gt=0, le=1)
    # With an IP-Adapter beside the base (<diffusion>/base/ip_adapter, trained by diffusion.pretrain), guided
    # references also take the guide as an image prompt at this scale (guide_strength 1: from noise, through the
    # IP-Adapter alone). None: img2img only.
    guide_ip_adapter_scale: float | None = Field(default=None, gt=0)
    max_adapters_per_replica: int = Field(default=4, ge=1)  # LoRA adapters a generation replica keeps loaded
    # The key requests must send as header X-API-Key: the ingress replica reads this env var, else
    # api_key_file, else api_key; with none of them the app refuses to start unless allow_anonymous.
    api_key_env: str = "DERMARAY_API_KEY"
    api_key_file: str | None = None  # a file on the ingress' node holding the key (a mounted secret), read there
    api_key: str | None = None  # the key in plain config: works, but logs a warning (a config travels in Ray's state)
    allow_anonymous: bool = False  # serve without a key (trials on this machine only); logs a warning
    call_timeout_s: float = Field(default=30.0, gt=0)  # ingress -> retrieval calls; 504 past it
    # The ingress replica runs retrieval itself (one hop per search instead of two; scale Ingress, not Retrieval,
    # which is then not deployed); false: a Retrieval deployment behind the ingress, scaled on its own.
    retrieval_in_ingress: bool = False
    generation_timeout_s: float = Field(default=120.0, gt=0)  # ingress -> generation (a cold replica loads first)

    @model_validator(mode="after")
    def _default_chain_denoises(self) -> ServeConfig:
        steps = min(self.steps, self.max_steps)
        if self.chain_guide != "none" and denoising_steps(steps, self.guide_strength) < 1:
            raise ValueError(
                f"steps {steps} at guide_strength {self.guide_strength} leave /chain's image-guided references no "
                f"denoising step: raise either, or set chain_guide: none"
            )
        return self


class DermarayConfig(Section):
    # fsspec storage options for every URI (s3fs: endpoint_url, client_kwargs, profile, ...). No credentials:
    # the standard chain, or `secrets_file`: a YAML file of options (key, secret, ...) read where a URI is opened.
    storage_options: dict[str, Any] = {}
    ray: RayConfig = RayConfig()
    models: ModelsConfig = ModelsConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    notes: NotesConfig = NotesConfig()
    grounding: GroundingConfig = GroundingConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    grounding_eval: GroundingEvalConfig = GroundingEvalConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    diffusion_eval: DiffusionEvalConfig = DiffusionEvalConfig()
    report: ReportConfig = ReportConfig()
    pipeline: PipelineConfig = PipelineConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        return refuse_credentials(value, "storage_options")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DermarayConfig:
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level of a config must be a mapping")
    cfg = DermarayConfig.model_validate(apply_overrides(data, list(overrides or [])))
    cache = cfg.models.cache_dir
    if not cache.startswith("~") and not os.path.isabs(cache):  # Ray workers run in other directories
        cfg.models.cache_dir = os.path.abspath(cache)
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
