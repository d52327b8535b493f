"""Grounding cores without a cluster: scaler, model modes, checkpoint files, text encoder, evaluation."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from dermaray.config import ModelsConfig
from dermaray.grounding.data import PIXELS
from dermaray.grounding.embed import PREDICTED_PREFIX
from dermaray.grounding.evaluate import evaluate_set, markdown, matrix, ridge_probe, value_knn
from dermaray.grounding.model import (
    AttributeScaler,
    GroundingModel,
    GroundingSettings,
    augment,
    load_model,
    merge_lora,
    save_model,
)
from dermaray.grounding.text import TextEncoder
from dermaray.notes.prompts import states_label
from jobs.training import warmup_cosine

ATTRS = ["area_mm2", "eccentricity"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelsConfig:
    return ModelsConfig(cache_dir=str(tmp_path_factory.mktemp("models")))


def test_scaler_learns_sizes_on_a_log_scale_and_inverts_exactly() -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.lognormal(2, 0.6, 500), rng.uniform(0, 1, 500)], axis=1)
    scaler = AttributeScaler.fit(ATTRS, values)
    assert scaler.log == [True, False]  # area is a size, eccentricity is not
    z = scaler.transform(values)
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z.std(0), 1, atol=1e-4)
    assert np.allclose(scaler.inverse(z), values, rtol=1e-5)
    assert AttributeScaler.fit(ATTRS, values, log_sizes=False).log == [False, False]


def test_scaler_refuses_what_it_cannot_scale() -> None:
    with pytest.raises(ValueError, match="constant"):
        AttributeScaler.fit(ATTRS, np.array([[1.0, 0.2], [2.0, 0.2], [3.0, 0.2]]))
    with pytest.raises(ValueError, match="finite"):
        AttributeScaler.fit(ATTRS, np.array([[1.0, np.nan], [2.0, 0.2]]))
    with pytest.raises(ValueError, match="unknown attributes"):
        GroundingSettings("tiny", ["area", "eccentricity"])


@pytest.mark.parametrize(
    ("tune", "trains"),
    [
        ("frozen", {"heads"}),
        ("projector", {"heads", "projector"}),
        ("lora", {"heads", "projector", "lora"}),
        ("full", {"heads", "projector", "tower"}),
    ],
)
def test_tune_mode_decides_what_trains(models: ModelsConfig, tune: str, trains: set[str]) -> None:
    model = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune=tune), models)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {
        "heads" if n.startswith("heads.") else "projector" if ".projector." in n else "lora" if "lora_" in n else "tower"
        for n in trainable
    }
    assert kinds == trains
    out = model(torch.randn(3, 3, 64, 64))
    assert out["embedding"].shape == (3, model.embedder.dim) and out["attributes"].shape == (3, 2)


def test_image_size_resizes_the_input_and_interpolates_the_tower(models: ModelsConfig, tmp_path: Path) -> None:
    """grounding.image_size: the 128 px tiles seen at 96 px by a tower trained at 64; saved with the checkpoint, so
    the embedder of the grounded model preprocesses at that size too."""
    from dermaray.data.synthetic import synthesize_lesion
    from dermaray.grounding.data import Preprocessor
    from dermaray.grounding.embed import LesionEmbedder

    model = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full", image_size=96), models)
    jpeg = [synthesize_lesion(4, i)[1] for i in range(3)]
    pixels = Preprocessor("tiny", models, keep=(), image_size=96)({"image_bytes": np.array(jpeg, dtype=object)})[PIXELS]
    assert pixels.shape == (3, 3, 96, 96)
    with torch.no_grad():
        at_96 = model(torch.from_numpy(pixels))
        at_64 = model(torch.nn.functional.interpolate(torch.from_numpy(pixels), size=64, mode="area"))
    assert at_96["embedding"].shape == at_64["embedding"].shape == (3, model.embedder.dim)
    assert not torch.allclose(at_96["embedding"], at_64["embedding"])  # it does see the larger image
    save_model(tmp_path / "m", model, AttributeScaler(ATTRS, [0.0, 0.0], [1.0, 1.0], [False, False]))
    embedder = LesionEmbedder(str(tmp_path / "m"), "tiny", models)
    assert embedder.preprocess.processor.crop_size == {"height": 96, "width": 96}


def test_the_scaler_is_fitted_on_every_clinics_train_split(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from dermaray.config import load_config
    from jobs.grounding import fit_scaler

    areas = {"clinic": [1.0, 2.0, 4.0, 100.0], "shifted": [8.0, 16.0, 100.0]}  # the last of each: its test split
    for clinic, values in areas.items():
        (tmp_path / clinic).mkdir()
        splits = ["train"] * (len(values) - 1) + ["test"]
        pq.write_table(pa.table({"split": splits, "area_mm2": values}), tmp_path / clinic / "part-0.parquet")
    tables = [f"grounding.input={tmp_path}/clinic", f"grounding.mixed_inputs=[{tmp_path}/shifted]"]
    scaler, counts = fit_scaler(load_config(None, [*tables, "grounding.attributes=[area_mm2]"]).grounding, {})
    assert counts == {"train": 5, "val": 0, "test": 2}
    assert scaler.mean == pytest.approx([np.log([1, 2, 4, 8, 16]).mean()])  # both train splits, on a log scale


def test_feature_layer_is_read_saved_and_kept_by_a_classifier_started_from_it(models: ModelsConfig, tmp_path: Path) -> None:
    from dermaray.grounding.classifier import ClassifierSettings, MultimodalClassifier, load_classifier, save_classifier

    last = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full", feature_layer=-1), models)
    own = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full"), models)
    assert (own.embedder.feature_layer, last.embedder.feature_layer) == (-2, -1)  # the tiny LLaVA's own: the penultimate
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(last.embed(x), own.embed(x))
    save_model(tmp_path / "m", last.eval(), AttributeScaler(ATTRS, [0.0, 0.0], [1.0, 1.0], [False, False]))
    loaded = load_model(tmp_path / "m", models)[0]
    with torch.no_grad():
        assert loaded.embedder.feature_layer == -1 and torch.allclose(loaded.embed(x), last.embed(x), atol=1e-6)
    # A classifier started from it is rebuilt from the base when loaded: it must still read that layer.
    settings = ClassifierSettings(model="tiny", classes=["MEL", "NEV"], text_encoder="tiny", text_dim=32)
    started = MultimodalClassifier.build(settings, models, init_from=str(tmp_path / "m")).eval()
    save_classifier(tmp_path / "c", started)
    reloaded = load_classifier(tmp_path / "c", models)
    with torch.no_grad():
        assert reloaded.image.feature_layer == -1 and torch.allclose(reloaded.encode_image(x), started.encode_image(x), atol=1e-6)
    with pytest.raises(ValueError, match="feature layer 3: the tower has 3 hidden states"):
        GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, feature_layer=3), models)


class _Scaled(torch.nn.Module):
    """An embedder whose embedding is `factor` times another's: the same directions, other lengths."""

    def __init__(self, embedder: torch.nn.Module, factor: float):
        super().__init__()
        self.embedder, self.factor = embedder, factor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.factor * self.embedder(pixel_values)


@pytest.mark.parametrize("heads_read", ["embedding", "direction"])
def test_direction_heads_read_only_what_the_cosine_index_compares(models: ModelsConfig, heads_read: str) -> None:
    torch.manual_seed(0)
    model = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full", heads_read=heads_read), models).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["attributes"]
        model.embedder = _Scaled(model.embedder, 5.0)  # every embedding 5x as long, pointing the same way
        after = model(x)["attributes"]
    # Heads on the direction predict the same; heads on the embedding read its length too.
    assert torch.allclose(before, after, atol=1e-5) == (heads_read == "direction")


def test_direction_heads_survive_a_reload_and_older_checkpoints_read_the_embedding(models: ModelsConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full", heads_read="direction"), models).eval()
    x = torch.randn(3, 3, 64, 64)
    save_model(tmp_path / "m", model, AttributeScaler(ATTRS, [0.0, 0.0], [1.0, 1.0], [False, False]))
    loaded = load_model(tmp_path / "m", models)[0]
    assert loaded.settings.heads_read == "direction"
    with torch.no_grad():
        assert torch.allclose(loaded(x)["attributes"], model(x)["attributes"], atol=1e-6)
    # A checkpoint saved before the setting existed has no such field: its heads read the embedding, as they were trained.
    saved = json.loads((tmp_path / "m" / "grounding.json").read_text())
    del saved["settings"]["heads_read"]
    (tmp_path / "m" / "grounding.json").write_text(json.dumps(saved))
    assert load_model(tmp_path / "m", models)[0].settings.heads_read == "embedding"


def test_a_classifier_started_from_a_grounded_tower_sees_images_at_the_side_it_learned(
    models: ModelsConfig, tmp_path: Path
) -> None:
    from PIL import Image

    from dermaray.grounding.classifier import (
        ClassifierSettings,
        MultimodalClassifier,
        classifier_processor,
        load_classifier,
        save_classifier,
    )
    from dermaray.grounding.model import grounding_settings
    from jobs.classifier import ClassifierInputs

    grounded = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="full", image_size=96), models)
    save_model(tmp_path / "m", grounded.eval(), AttributeScaler(ATTRS, [0.0, 0.0], [1.0, 1.0], [False, False]))
    assert grounding_settings(str(tmp_path / "m")).image_size == 96  # read without loading the weights
    settings = ClassifierSettings(model="tiny-pretrained", classes=["MEL", "NEV"], text_encoder="tiny", text_dim=32)
    image = Image.new("RGB", (150, 120), (180, 120, 100))

    def side(s: ClassifierSettings) -> tuple[int, int]:
        return classifier_processor(s, models)(images=[image], return_tensors="np")[PIXELS].shape[-2:]

    assert side(ClassifierSettings(model="tiny", classes=["MEL"], text_encoder="tiny", text_dim=32)) == (64, 64)  # its own
    save_classifier(tmp_path / "c", MultimodalClassifier.build(settings, models, init_from=str(tmp_path / "m")))
    reloaded = load_classifier(tmp_path / "c", models)
    assert reloaded.settings.image_size == 96 and side(reloaded.settings) == (96, 96)
    assert reloaded.settings.model == "tiny"  # the grounded start's base, not the one the settings named
    # The job's training inputs at that side too: jobs.classifier.image_input reads it from classifier.init_from.
    from dermaray.config import load_config
    from jobs.classifier import image_input

    overrides = ["models.grounding_mllm=tiny-pretrained"]
    assert image_input(load_config(None, [*overrides, f"classifier.init_from={tmp_path / 'm'}"])) == ("tiny", 96)
    assert image_input(load_config(None, [*overrides, "classifier.init_from=null"])) == ("tiny-pretrained", None)
    notes = pa.table({"lesion_id": ["a"], "note": ["a pink papule"]})
    inputs = ClassifierInputs(models, notes, "diagnosis", "tiny", image_size=96)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG")
    batch = {"lesion_id": np.array(["a"]), "image_bytes": np.array([jpeg.getvalue()], object), "diagnosis": np.array(["MEL"])}
    assert inputs(batch)[PIXELS].shape[-2:] == (96, 96)


def test_checkpoint_files_restore_the_same_predictions(models: ModelsConfig, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = GroundingModel.from_settings(GroundingSettings("tiny", ATTRS, tune="lora"), models)
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    scaler = AttributeScaler(ATTRS, [1.0, 0.5], [0.3, 0.1], [True, False])
    save_model(tmp_path / "m", model.eval(), scaler, {"epoch": 3})
    loaded, loaded_scaler, extra = load_model(tmp_path / "m", models)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["attributes"], loaded(x)["attributes"], atol=1e-6)
    assert loaded_scaler == scaler and extra.pop("weights_sha256") and extra == {"epoch": 3}
    # Only the trained weights are stored: LoRA, projector and heads, not the frozen tower.
    stored = torch.load(tmp_path / "m" / "trainable.pt", weights_only=True)
    assert stored and all(".projector." in n or "lora_" in n or n.startswith("heads.") for n in stored)
    # Folding the adapters into the tower leaves the embedding unchanged.
    with torch.no_grad():
        before = loaded.embed(x)
        merged = merge_lora(loaded.embedder)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(before, merged(x), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a grounding checkpoint"):
        load_model(tmp_path, models)
    # A weights file that is not the one the settings were saved with (a copy cut short, another run's) is refused.
    torch.save({n: t + 1 for n, t in stored.items()}, tmp_path / "m" / "trainable.pt")
    with pytest.raises(ValueError, match="not the file grounding.json was saved with"):
        load_model(tmp_path / "m", models)


def test_augment_is_a_flip_or_quarter_turn_of_the_batch() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    symmetries = [
        torch.rot90(x, k, dims=(-2, -1)).flip(-1) if f else torch.rot90(x, k, dims=(-2, -1)) for k in range(4) for f in (0, 1)
    ]
    seen = set()
    for seed in range(40):
        y = augment(x, torch.Generator().manual_seed(seed))
        matches = [i for i, s in enumerate(symmetries) if torch.equal(y, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 8


def test_schedule_warms_up_then_decays_to_zero_and_stays() -> None:
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) < f(20) < 1.0 and f(100) == pytest.approx(0.0) and f(150) == pytest.approx(0.0)


def test_text_encoder_embeds_notes_as_unit_vectors(models: ModelsConfig) -> None:
    encoder = TextEncoder("tiny", models)
    z = encoder.encode(["A 5 mm brown macule on the back.", "An asymmetric lesion.", ""] * 30, batch_size=16)
    assert z.shape == (90, encoder.dim) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert np.allclose(z[0], z[3], atol=1e-5) and not np.allclose(z[0], z[1])
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_notes_stating_the_label_are_recognised() -> None:
    assert states_label("P2+label+demo+attr") and states_label("P1+demo") and states_label("M+label+attr")
    assert not states_label("M+demo+attr") and not states_label("P3") and not states_label("M")
    assert not states_label("LF+demo+attr")


def test_ridge_probe_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    w = rng.normal(size=(8, 2))
    weights, intercept = ridge_probe(x, x @ w + 3.0, alpha=1e-6)
    assert np.allclose(weights, w, atol=1e-4) and np.allclose(intercept, 3.0, atol=1e-4)


def test_value_knn_is_leave_one_out_by_value() -> None:
    found = value_knn(np.array([0.0, 10.0, 1.0, 11.0, 2.5]), 2, chunk=2)
    assert found.tolist() == [[2, 4], [3, 4], [0, 4], [1, 4], [2, 0]]


def _frames(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A 'grounded' embedding that encodes the attributes and a 'frozen' one that is noise."""
    rng = np.random.default_rng(seed)
    area, ecc = rng.lognormal(2, 0.5, n), rng.uniform(0.1, 0.9, n)
    base = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(n)], "area_mm2": area, "eccentricity": ecc})
    grounded_vectors = np.stack([np.log(area), ecc * 3, np.ones(n)], axis=1) + rng.normal(0, 0.01, (n, 3))
    grounded = base.assign(
        embedding=list(grounded_vectors.astype(np.float32)),
        **{PREDICTED_PREFIX + "area_mm2": area * 1.02, PREDICTED_PREFIX + "eccentricity": ecc},
    )
    frozen = base.assign(embedding=list(rng.normal(size=(n, 3)).astype(np.float32)))
    return frozen, grounded


def test_evaluation_separates_an_informative_embedding_from_noise() -> None:
    frozen, grounded = _frames()
    train_frozen, _ = _frames(seed=1)
    result = evaluate_set(frozen.sample(frac=1, random_state=0), grounded, train_frozen, ATTRS)  # order must not matter
    area = result["attributes"]["area_mm2"]
    assert area["prediction"]["grounded"]["spearman"] == pytest.approx(1.0)
    assert area["prediction"]["frozen_probe"]["spearman"] < 0.3
    assert area["retrieval"]["grounded"]["R@1"] > area["retrieval"]["frozen"]["R@1"] + 0.3
    assert area["retrieval"]["grounded_head"]["R@1"] > 0.9
    # 95% bootstrap intervals around the very figures reported; the R@1 gain paired per query
    grounded_r1, frozen_r1 = area["retrieval"]["grounded"], area["retrieval"]["frozen"]
    for kind in ("frozen", "grounded", "grounded_head"):
        value, low, high = area["retrieval"][kind]["R@1_ci"]
        assert value == pytest.approx(area["retrieval"][kind]["R@1"]) and low <= value <= high
    gain, low, high = grounded_r1["R@1_gain_ci"]
    assert gain == pytest.approx(grounded_r1["R@1"] - frozen_r1["R@1"]) and low > 0.3
    value, low, high = area["prediction"]["frozen_probe"]["spearman_ci"]
    assert value == pytest.approx(area["prediction"]["frozen_probe"]["spearman"]) and low < value < high
    table = markdown({"held-out": result})
    assert "| area_mm2 |" in table and "| eccentricity |" in table
    # Nor the grounded table's: every figure and interval is the same whatever order its rows were written in.
    assert evaluate_set(frozen, grounded.sample(frac=1, random_state=1), train_frozen, ATTRS) == result


def test_a_query_sample_scores_as_those_queries_of_the_whole_set() -> None:
    """Retrieval from a bounded sample of queries against the whole set: each sampled query gets the neighbours,
    relevant counts and scores it gets when every lesion queries (leave-one-out either way)."""
    from dermaray.grounding.evaluate import query_rows
    from dermaray.grounding.metrics import cosine_knn, relevant_counts, retrieval_metrics

    frozen, grounded = _frames(n=400)
    vectors, truth = matrix(grounded), grounded["area_mm2"].to_numpy()
    rows = query_rows(400, 60, seed=3)
    assert len(rows) == 60 and np.all(np.diff(rows) > 0) and query_rows(400, None).tolist() == list(range(400))
    everyone = cosine_knn(vectors, vectors, 10, exclude_self=True)
    sample = cosine_knn(vectors[rows], vectors, 10, self_rows=rows)
    np.testing.assert_array_equal(sample, everyone[rows])
    np.testing.assert_array_equal(value_knn(truth, 5, rows), value_knn(truth, 5)[rows])
    np.testing.assert_array_equal(
        relevant_counts(truth[rows], truth, tau=0.5, self_rows=rows),
        relevant_counts(truth, truth, tau=0.5, exclude_self=True)[rows],
    )
    whole = retrieval_metrics(truth, truth, everyone, tau=0.5, exclude_self=True)
    assert retrieval_metrics(truth, truth, everyone, tau=0.5, self_rows=np.arange(400)) == whole
    with pytest.raises(ValueError, match="among its neighbours"):
        retrieval_metrics(truth[rows], truth, np.repeat(rows[:, None], 10, axis=1), tau=0.5, self_rows=rows)
    with pytest.raises(ValueError, match="those rows"):
        cosine_knn(vectors[rows], vectors, 10, self_rows=rows[::-1])
    result = evaluate_set(frozen, grounded, _frames(seed=1)[0], ATTRS, max_queries=60, seed=3)
    assert result["lesions"] == 400 and result["queries"] == 60
    assert "60 sampled queries against all of them" in markdown({"held-out": result})


def test_an_index_is_refused_by_a_model_that_did_not_make_it():
    from dermaray.grounding.embed import frozen_identity, require_index_of

    grounded = {"model": "s3://b/grounding/model", "weights": "aa"}
    require_index_of({"model": "/copy/of/model", "model_weights": "aa"}, grounded, "idx")  # same weights elsewhere
    require_index_of({"model": "tiny:frozen", "model_weights": None}, frozen_identity("tiny"), "idx")
    require_index_of({}, grounded, "idx")  # an index that records nothing: nothing to check against
    for meta, identity in (
        ({"model": "s3://b/grounding/model", "model_weights": "bb"}, grounded),  # retrained in place
        ({"model": "tiny:frozen", "model_weights": None}, grounded),
        ({"model": "s3://b/grounding/model", "model_weights": "aa"}, frozen_identity("tiny")),
    ):
        with pytest.raises(ValueError, match="re-run the embeddings job"):
            require_index_of(meta, identity, "idx")


MIXED_SET = "domain shift, test split; mixed into training"


def test_study_table_reads_each_arms_figures() -> None:
    from dermaray.grounding.study import markdown, summarize

    frozen, grounded = _frames()
    train_frozen, _ = _frames(seed=1)
    informative = evaluate_set(frozen, grounded, train_frozen, ATTRS)
    # An arm whose "grounded" embedding is as uninformative as its frozen one: no gain.
    noise = evaluate_set(frozen, grounded.assign(embedding=frozen.embedding), train_frozen, ATTRS)
    arms = {
        "informative": {
            "grounding_eval": {
                "clinic held-out (test split)": informative,
                "shifted (domain shift, all lesions)": noise,
                "shifted (domain shift, test split)": noise,
            }
        },
        # An arm that trained on the shifted clinic too (mixed clinics): scored on its test split.
        "noise": {"grounding_eval": {"clinic held-out (test split)": noise, f"shifted ({MIXED_SET})": noise}},
    }
    study = {"lesions": 300, "shifted": 300, "epochs": 1, "arms": summarize(arms)}
    figures = study["arms"]
    assert figures["informative"]["r1_gain"]["area_mm2"][1] > 0.3  # the interval's low end
    assert figures["noise"]["r1_gain"]["area_mm2"][0] == 0.0
    assert "grounding_eval" not in figures["noise"]
    table = markdown(study)
    assert "| R@1 gain over frozen, area_mm2 | >= +0.15 | +0." in table
    assert "| Spearman shifted clinic, area_mm2 | >= 0.85 |" in table
    assert "| shifted clinic, lesions scored |  | 300 (all lesions) | 300 (test split) |" in table
    assert "| shifted clinic's test split (like for like), lesions |  | 300 | 300 |" in table
    assert "| Spearman shifted test split, area_mm2 |" in table
    # An evaluation with no shifted test split (one too small to query) still gives the shifted clinic's rows.
    without = {"clinic held-out (test split)": informative, "shifted (domain shift, all lesions)": noise}
    alone = markdown({**study, "arms": summarize({"informative": {"grounding_eval": without}})})
    assert "| Spearman shifted clinic, area_mm2 |" in alone and "like for like" not in alone
    assert "perimeter_mm" not in figures["noise"]["r1_gain"]  # only the attributes the arms grounded


def test_a_convolutional_tower_embeds_as_its_mllm_sees_and_keeps_its_batch_statistics(
    models: ModelsConfig, tmp_path: Path
) -> None:
    """tiny-conv, a FastVLM: loads as any hub checkout; the embedding is the mean of the tokens FastVLM's language
    model reads; batch statistics move only where the tower trains, and a checkpoint keeps them."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dermaray.data.synthetic import synthesize_lesion
    from dermaray.grounding.data import Preprocessor
    from dermaray.grounding.vision import ImageEmbedder
    from dermaray.models import resolve_model

    path = resolve_model("grounding_mllm", "tiny-conv", models)
    mllm = AutoModelForImageTextToText.from_pretrained(path)
    assert type(mllm).__name__ == "FastVlmForConditionalGeneration"
    assert AutoProcessor.from_pretrained(path).image_processor.crop_size == {"height": 128, "width": 128}
    jpeg = [synthesize_lesion(4, i)[1] for i in range(4)]
    pixels = torch.from_numpy(Preprocessor("tiny-conv", models, keep=())({"image_bytes": np.array(jpeg, dtype=object)})[PIXELS])
    assert pixels.shape == (4, 3, 128, 128)  # the tiles at their own side
    embedder = ImageEmbedder.from_pretrained(path)
    with torch.no_grad():
        seen = mllm.model.get_image_features(pixel_values=pixels).pooler_output  # [4, 64 tokens, width]
        assert seen.shape[1] == 64 and torch.allclose(embedder(pixels), seen.mean(dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="32 channels, the projector reads 64"):
        embedder.use_layer(-2)  # an earlier stage is narrower than the projector's input

    def statistics(model: GroundingModel) -> list[torch.Tensor]:
        return [b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")]

    projector_only = GroundingModel.from_settings(GroundingSettings("tiny-conv", ATTRS, tune="projector"), models)
    before = statistics(projector_only)
    projector_only.train()(pixels)
    assert all(torch.equal(a, b) for a, b in zip(before, statistics(projector_only), strict=True))  # frozen tower

    full = GroundingModel.from_settings(GroundingSettings("tiny-conv", ATTRS, tune="full"), models)
    full.train()(pixels)
    assert not any(torch.equal(a, b) for a, b in zip(before, statistics(full), strict=True))
    save_model(tmp_path / "m", full.eval(), AttributeScaler(ATTRS, [0.0, 0.0], [1.0, 1.0], [False, False]))
    loaded = load_model(tmp_path / "m", models)[0]
    with torch.no_grad():
        assert torch.allclose(full(pixels)["attributes"], loaded(pixels)["attributes"], atol=1e-6)
