"""Small real artifacts for the Serve tests, built in seconds from the cores (no Ray Train).

The same files the pipeline writes, in the same layouts: a canonical lesion table, a grounding
checkpoint (tiny tower, untrained heads), its embeddings table, vector index and thumbnails, an
image + note classifier checkpoint and the index of its image projections, and a diffusion
folder with a tiny base (and its IP-Adapter), the shared adapter and one per-diagnosis adapter (MEL). The models
are untrained: the tests check the serving, not the model quality (a gallery image finds
itself first whatever the weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dermaray.data.readers import Isic2024Reader
from dermaray.data.synthetic import synthesize_lesion
from dermaray.schema import LESION_SCHEMA

GROUNDED = ["area_mm2", "eccentricity", "color_std_mean"]
PER_DIAGNOSIS = "MEL"  # the one diagnosis with an adapter of its own
THUMBNAIL_PX = 96
CHUNK = 512  # lesions per forward pass


def lesion_table(n: int, image_size: int = 64) -> pa.Table:
    reader, rows = Isic2024Reader(), []
    for index in range(n):
        row, jpeg, _, _ = synthesize_lesion(0, index, image_size=image_size)
        rows.append(
            {
                **reader.to_canonical({k: str(v) for k, v in row.items()}),
                "lesion_id": row["isic_id"],
                "source": "isic2024",
                "image_bytes": jpeg,
                "image_format": "JPEG",
                "image_width": image_size,
                "image_height": image_size,
                "split": "train",
            }
        )
    return pa.Table.from_pylist(rows, schema=LESION_SCHEMA)


def build(root: Path, cache_dir: Path, n_lesions: int = 24, diffusion: bool = True, lesions: pa.Table | None = None) -> list[str]:
    """Write every artifact under `root` (over `lesions`, else `n_lesions` synthetic ones); returns the `serve.*`
    overrides that point at them."""
    from dermaray.config import ModelsConfig
    from dermaray.grounding.classifier import ClassifierSettings, ImageProjector, MultimodalClassifier, save_classifier
    from dermaray.grounding.data import CLASS_CODES
    from dermaray.grounding.embed import THUMBNAIL, LesionEmbedder
    from dermaray.grounding.model import AttributeScaler, GroundingModel, GroundingSettings, save_model
    from dermaray.retrieval import VectorIndex
    from dermaray.serving.thumbnails import with_thumbnails, write_thumbnails

    models = ModelsConfig(cache_dir=str(cache_dir))
    torch.manual_seed(0)
    lesions = lesion_table(n_lesions) if lesions is None else lesions
    (root / "lesions").mkdir(parents=True)
    pq.write_table(lesions, root / "lesions" / "part-0.parquet")

    model = GroundingModel.from_settings(GroundingSettings("tiny", GROUNDED, tune="full"), models)
    scaler = AttributeScaler.fit(GROUNDED, np.stack([lesions[a].to_numpy() for a in GROUNDED], axis=1))
    save_model(root / "grounding", model.eval(), scaler)

    embedder = LesionEmbedder(str(root / "grounding"), "tiny", models)
    (root / "embeddings").mkdir()
    parts = []
    for start in range(0, lesions.num_rows, CHUNK):  # in chunks, as the job's batches: galleries of any size
        chunk = with_thumbnails(lesions.slice(start, CHUNK), THUMBNAIL_PX, THUMBNAIL)
        parts.append(embedder({name: chunk[name].to_numpy(zero_copy_only=False) for name in chunk.column_names}))
    embedded = pa.concat_tables(parts)
    pq.write_table(embedded, root / "embeddings" / "part-0.parquet")
    vectors = np.stack(embedded["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    VectorIndex.build(
        vectors,
        embedded["lesion_id"].to_pylist(),
        kind="exact",
        model=str(root / "grounding"),
        model_weights=embedder.identity["weights"],
    ).save(str(root / "index"))
    chunks = [(embedded["lesion_id"].to_pylist(), embedded[THUMBNAIL].to_pylist())]
    write_thumbnails(str(root / "thumbnails"), chunks, THUMBNAIL_PX)

    settings = ClassifierSettings(model="tiny", classes=list(CLASS_CODES), text_encoder="minilm", text_dim=384)
    save_classifier(root / "classifier", MultimodalClassifier.build(settings, models).eval())
    projector = ImageProjector(str(root / "classifier"), models)
    columns = ("lesion_id", "image_bytes")
    projected = [
        projector({c: lesions[c].slice(start, CHUNK).to_numpy(zero_copy_only=False) for c in columns})
        for start in range(0, lesions.num_rows, CHUNK)
    ]
    VectorIndex.build(
        np.concatenate([p["embedding"] for p in projected]),
        [i for p in projected for i in p["lesion_id"].tolist()],
        kind="exact",
        model=f"{root / 'classifier'}:image_projection",
        model_weights=projector.weights,
    ).save(str(root / "image_projections"))

    overrides = [
        f"serve.grounding_model={root / 'grounding'}",
        f"serve.index={root / 'index'}",
        f"serve.embeddings={root / 'embeddings'}",
        f"serve.lesions={root / 'lesions'}",
        f"serve.thumbnails={root / 'thumbnails'}",
        f"serve.classifier={root / 'classifier'}",
        f"serve.text_index={root / 'image_projections'}",
        f"models.cache_dir={cache_dir}",
    ]
    if diffusion:
        build_diffusion(root / "diffusion", cache_dir, lesions)
        overrides += [
            f"serve.diffusion={root / 'diffusion'}",
            "serve.resolution=32",
            "serve.steps=2",
            "serve.guide_ip_adapter_scale=0.5",  # the base has an IP-Adapter: guided references use it too
        ]
    else:
        overrides.append("serve.diffusion=null")
    return overrides


def build_diffusion(root: Path, cache_dir: Path, lesions: pa.Table) -> None:
    from dermaray.config import ModelsConfig
    from dermaray.diffusion.captions import caption
    from dermaray.diffusion.pipeline import add_lora, load_pipeline, lora_parameters, pretrain_base, save_lora
    from dermaray.images import decode_rgb
    from dermaray.models import resolve_model

    images = [decode_rgb(b) for b in lesions["image_bytes"].to_pylist()[:4]]
    prompts = [caption(code) for code in lesions["diagnosis"].to_pylist()[:4]]
    pretrain_base(
        resolve_model("diffusion_base", "tiny", ModelsConfig(cache_dir=str(cache_dir))),
        root / "base",
        images,
        prompts,
        vae_steps=1,
        unet_steps=1,
        ip_adapter_steps=1,
        batch_size=2,
        lr=1e-3,
        seed=0,
        log_every=1,
        resolution=16,
    )
    for seed, folder in ((1, root / "adapter"), (2, root / "adapters" / PER_DIAGNOSIS)):
        pipe = load_pipeline(root / "base")
        add_lora(pipe.unet, rank=4, seed=seed)
        with torch.no_grad():  # B starts at zero (adapter = identity): move it so each adapter changes the images
            generator = torch.Generator().manual_seed(seed)
            for p in lora_parameters(pipe.unet):
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
        save_lora(pipe, folder)
