"""Grounding, embeddings, evaluation and the classifier as Ray jobs: real local cluster, real S3 endpoint."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from dermaray.config import load_config
from dermaray.retrieval import VectorIndex
from dermaray.storage import read_parquet
from jobs import classifier, embeddings, grounding, grounding_eval, notes
from tests.helpers import kill_driver_after_first_checkpoint

LESIONS = "s3://dermaray/ingest/lesions"
# Photometric views are tested in test_grounding_photometric and run by test_pipeline: these tests are about
# the job (S3, checkpoints, resume, export), which they do not change, and they cost CPU per step.
FAST = [
    "grounding.train.batch_size=64",
    "grounding.attributes=[area_mm2, eccentricity, delta_lb_norm]",
    "grounding.photometric=false",
]


def _config(s3_options, *overrides):
    cfg = load_config(None, list(overrides))
    cfg.storage_options = s3_options
    return cfg


def _train_count(s3_options) -> int:
    splits = read_parquet(LESIONS, s3_options, columns=["split"]).column("split").to_pylist()
    return splits.count("train")


@pytest.fixture(scope="module")
def grounded(ingested_on_s3, s3_options):
    """Two epochs of LoRA grounding on the 2,000 lesions on S3, checkpoints and model on S3, stepped as on a
    GPU: bf16 mixed precision, 2 micro-batches of 32 per step of 64, clipping, gradient checkpointing."""
    cfg = _config(
        s3_options,
        *FAST,
        f"grounding.input={LESIONS}",
        "grounding.output=s3://dermaray/grounding",
        "grounding.tune=lora",
        "grounding.train.epochs=2",
        "grounding.train.batch_size=32",
        "grounding.train.grad_accumulation=2",
        "grounding.train.precision=bf16-mixed",
        "grounding.train.max_grad_norm=1.0",
        "grounding.train.gradient_checkpointing=true",
    )
    return grounding.run(cfg)


def test_grounding_trains_checkpoints_and_exports_to_s3(grounded, s3_options):
    steps_per_epoch = math.ceil(_train_count(s3_options) / 64)
    assert grounded["epochs"] == 2 and grounded["steps"] == 2 * steps_per_epoch and grounded["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in grounded["history"]] == [1, 2]
    assert all(np.isfinite(h["val_loss"]) and h["val_mae_area_mm2"] > 0 for h in grounded["history"])
    assert all(h["precision"] == "bf16-mixed" and np.isfinite(h["grad_norm"]) for h in grounded["history"])
    fs = s3fs.S3FileSystem(**s3_options)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("dermaray/grounding/model")) == ["grounding.json", "trainable.pt"]
    checkpoints = [p for p in fs.ls("dermaray/grounding/runs/grounding") if "/checkpoint_" in p and not p.endswith(".json")]
    assert 1 <= len(checkpoints) <= 2  # num_to_keep
    saved = json.loads(fs.cat(f"{sorted(checkpoints)[-1]}/train_config.json"))  # the settings beside each checkpoint
    assert saved["precision"] == "bf16-mixed" and saved["grad_accumulation"] == 2 and saved["batch_size"] == 32


@pytest.fixture(scope="module")
def embedded(grounded, s3_options):
    """The grounded and the frozen model's embeddings, index and thumbnails of the lesions on S3."""
    return {
        name: embeddings.run(
            _config(
                s3_options,
                f"embeddings.input={LESIONS}",
                f"embeddings.output=s3://dermaray/emb/{name}/clinic",
                f"embeddings.model={model}",
                "embeddings.index.kind=ivf",
            )
        )
        for name, model in (("grounded", "s3://dermaray/grounding/model"), ("frozen", "frozen"))
    }


def test_embeddings_index_and_evaluation(embedded, s3_options, tmp_path):
    out = embedded
    lesions = read_parquet(LESIONS, s3_options, columns=["lesion_id"]).num_rows
    assert out["grounded"]["lesions"] == out["frozen"]["lesions"] == lesions
    table = read_parquet("s3://dermaray/emb/grounded/clinic/embeddings", s3_options)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)  # plain Parquet, not a Ray tensor type
    assert {"predicted_area_mm2", "predicted_eccentricity", "area_mm2", "split", "diagnosis"} <= set(table.column_names)
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    index = VectorIndex.load("s3://dermaray/emb/grounded/clinic/index", s3_options)
    assert len(index) == lesions and index.kind == "ivf"
    # The index names the model and the digest of its weights (what a Serve replica checks before serving it).
    settings = json.loads(s3fs.S3FileSystem(**s3_options).cat_file("dermaray/grounding/model/grounding.json"))
    assert index.meta["model"] == "s3://dermaray/grounding/model" and index.meta["model_weights"] == settings["weights_sha256"]
    frozen = VectorIndex.load("s3://dermaray/emb/frozen/clinic/index", s3_options).meta
    assert frozen["model"] == "tiny:frozen" and frozen["model_weights"] is None  # what a replica of the frozen tower checks
    hits = index.search_ids(vectors[:5], k=3)
    assert [h[0][0] for h in hits] == table["lesion_id"].to_pylist()[:5]  # each finds itself first

    results = grounding_eval.run(
        _config(
            s3_options,
            "grounding_eval.frozen=s3://dermaray/emb/frozen",
            "grounding_eval.grounded=s3://dermaray/emb/grounded",
            "grounding_eval.domains=[clinic]",
            f"grounding_eval.output={tmp_path}/report",
        )
    )
    (held_out,) = results.values()
    area = held_out["attributes"]["area_mm2"]
    assert set(area["retrieval"]) == {"frozen", "grounded", "grounded_head"}
    assert 0 <= area["retrieval"]["grounded"]["R@1"] <= 1 and np.isfinite(area["prediction"]["grounded"]["mae"])
    assert "| area_mm2 |" in (tmp_path / "report" / "grounding_eval.md").read_text()


def test_a_clinic_mixed_into_training_is_scored_on_its_test_split(embedded, s3_options, tmp_path):
    fs = s3fs.S3FileSystem(**s3_options)
    for name in ("frozen", "grounded"):  # the same lesions stand in for a second clinic
        fs.copy(f"dermaray/emb/{name}/clinic", f"dermaray/emb/{name}/second", recursive=True)
    runs = {}
    for trained_on in ("[]", "[second]"):
        overrides = ["grounding_eval.frozen=s3://dermaray/emb/frozen", "grounding_eval.grounded=s3://dermaray/emb/grounded"]
        runs[trained_on] = grounding_eval.run(
            _config(
                s3_options,
                *overrides,
                "grounding_eval.domains=[clinic, second]",
                f"grounding_eval.trained_on={trained_on}",
                f"grounding_eval.output={tmp_path}/{len(runs)}",
            )
        )
    splits = read_parquet(LESIONS, s3_options, columns=["split"]).column("split").to_pylist()
    assert runs["[]"]["second (domain shift, all lesions)"]["lesions"] == len(splits)
    assert runs["[]"]["second (domain shift, test split)"]["lesions"] == splits.count("test")  # like for like
    assert "second (domain shift, all lesions)" not in runs["[second]"]
    mixed = runs["[second]"]["second (domain shift, test split; mixed into training)"]
    assert mixed["lesions"] == splits.count("test") < len(splits)
    with pytest.raises(ValueError, match="trained_on"):
        overrides = ["grounding_eval.domains=[clinic]", "grounding_eval.trained_on=[second]", f"grounding_eval.output={tmp_path}"]
        grounding_eval.run(_config(s3_options, *overrides))


def test_killed_driver_resumes_from_the_last_checkpoint(ingested_on_s3, s3_options, ray_cluster, tmp_path):
    """SIGKILL the training driver after its first checkpoint; the re-run continues to the same final step."""
    out, epochs = tmp_path / "g", 6
    args = [
        *FAST,
        f"grounding.input={LESIONS}",
        f"grounding.output={out}",
        "grounding.tune=full",
        f"grounding.train.epochs={epochs}",
    ]
    kill_driver_after_first_checkpoint("grounding", args, out / "runs" / "grounding", s3_options, ray_cluster)

    summary = grounding.run(_config(s3_options, *args))
    assert 1 <= summary["resumed_from_epoch"] < epochs, "the kill must land mid-run"
    steps_per_epoch = math.ceil(_train_count(s3_options) / 64)
    assert summary["epochs"] == epochs and summary["steps"] == epochs * steps_per_epoch
    assert [h["epoch"] for h in summary["history"]] == list(range(1, epochs + 1))  # no epoch lost or repeated
    assert [h["step"] for h in summary["history"]] == [steps_per_epoch * e for e in range(1, epochs + 1)]


@pytest.fixture(scope="module")
def classified(grounded, s3_options, tmp_path_factory):
    """The classifier trained on the lesions on S3 and their label-free notes; its output folder."""
    out = tmp_path_factory.mktemp("classifier")
    notes.run(
        _config(
            s3_options,
            "notes.strategy=M",
            "notes.label_hierarchy=false",
            f"notes.input={LESIONS}",
            f"notes.output={out}/notes/clinic",
        )
    )
    summary = classifier.run(
        _config(
            s3_options,
            "models.text_encoder=tiny",
            f"classifier.input={LESIONS}",
            f"classifier.notes={out}/notes/clinic",
            "classifier.shifted_input=null",
            f"classifier.output={out}/clf",
            "classifier.init_from=s3://dermaray/grounding/model",
            "classifier.train.epochs=2",
            "classifier.train.batch_size=64",
        )
    )
    return out / "clf", summary


def test_classifier_image_vs_image_and_note(classified):
    folder, summary = classified
    assert summary["lesions_without_note"] == 0 and summary["epochs"] == 2
    (result,) = summary["eval"].values()
    assert result["lesions"] == summary["lesions_with_note"]["test"] > 0
    for head in ("image", "fused"):
        assert 0 <= result[head]["accuracy"] <= 1 and len(result[head]["confusion"]) == 9
    assert set(result["image_to_note"]) >= {"P@1", "P@5", "P@10", "mAP"}
    assert "| image + note |" in (folder / "classifier_eval.md").read_text()


def test_a_replica_serves_the_thumbnails_and_projections_the_jobs_wrote(embedded, classified, s3_options):
    """Thumbnails (embeddings job) and image projections (classifier job) are read, not recomputed, by a replica."""
    from dermaray.images import decode_rgb
    from dermaray.serving.retriever import Retriever
    from dermaray.serving.thumbnails import thumbnail_jpeg

    folder, summary = classified
    emb = "s3://dermaray/emb/grounded/clinic"
    cfg = _config(
        s3_options,
        "models.text_encoder=tiny",
        "serve.grounding_model=s3://dermaray/grounding/model",
        f"serve.index={emb}/index",
        f"serve.embeddings={emb}/embeddings",
        f"serve.lesions={LESIONS}",
        f"serve.thumbnails={emb}/thumbnails",
        f"serve.classifier={folder}/model",
        f"serve.text_index={folder}/image_projections",
    )
    lesions = read_parquet(LESIONS, s3_options, columns=["lesion_id", "image_bytes"]).to_pylist()
    assert embedded["grounded"]["thumbnails"]["count"] == summary["image_projections"]["count"] == len(lesions)
    retriever = Retriever(cfg.serve, cfg.models, s3_options)
    assert retriever.info()["thumbnails"] and retriever.text_index is not None
    for lesion in lesions[:: len(lesions) // 5]:
        assert retriever.thumbnail(lesion["lesion_id"]) == thumbnail_jpeg(lesion["image_bytes"], 96)
        own = retriever.projector.project([decode_rgb(lesion["image_bytes"])])
        scores = dict(retriever.text_index.search_ids(own, len(lesions))[0])
        assert scores[lesion["lesion_id"]] == pytest.approx(1.0, abs=1e-4)  # cosine 1: the projection the replica makes
    assert len(retriever.search_text("a pink papule", k=3)["results"]) == 3


def test_classifier_refuses_notes_that_state_the_label(tmp_path):
    pq.write_table(
        pa.table({"lesion_id": ["a"], "prompt_id": ["P2+label+demo+attr"], "note": ["Melanoma."], "error": [None]}),
        tmp_path / "notes.parquet",
    )
    with pytest.raises(ValueError, match="make the classification trivial"):
        classifier.usable_notes(str(tmp_path / "notes.parquet"), False, {})
    assert classifier.usable_notes(str(tmp_path / "notes.parquet"), True, {}).num_rows == 1
