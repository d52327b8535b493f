"""ISIC 2024's own labels: most real rows carry only iddx_1 and `target`, no finer diagnosis.

Pure parts first (the challenge's partial AUC against hand-computed cases, label selection, the
reader, the chain's choice of diagnosis), then the jobs on the local Ray cluster over synthetic
ISIC 2024-format input where three lesions in four have only iddx_1: ingest, the classifier on
`malignant` and on `diagnosis`, per-diagnosis diffusion, and the Serve app over that gallery.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermaray.config import ClassifierConfig, load_config
from dermaray.data.readers import Isic2024Reader
from dermaray.data.synthetic import synthesize_lesion
from dermaray.data.validate import RowRejected
from dermaray.grounding.labels import LABELS, balanced_class_weights, label_spec, tally
from dermaray.grounding.metrics import partial_auc_above_tpr, roc_curve
from dermaray.serving.chain import chain_diagnosis

# ----------------------------------------------------------------------------- the challenge metric


def test_partial_auc_hand_computed_cases() -> None:
    # Positives score 0.9 and 0.4, negatives 0.6 and 0.1: TPR is 1 only once FPR reaches 0.5, so above
    # TPR 0.8 the curve leaves 1 - FPR = 0.5 over a TPR band of 0.2: 0.1.
    assert partial_auc_above_tpr([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1]) == pytest.approx(0.1)
    assert partial_auc_above_tpr([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.2)  # perfect: the maximum
    assert partial_auc_above_tpr([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)  # reversed
    assert partial_auc_above_tpr([1, 0, 1, 0], [0.5] * 4) == pytest.approx(0.02)  # all tied: the chance diagonal
    # The positive ties with one of four negatives at the top: the ROC curve runs straight from (0, 0) to
    # (0.25, 1), FPR = TPR / 4, so the area is the integral of 1 - t/4 over t in [0.8, 1] = 0.2 - 0.045.
    assert partial_auc_above_tpr([1, 0, 0, 0, 0], [0.5, 0.5, 0.4, 0.3, 0.2]) == pytest.approx(0.155)
    assert partial_auc_above_tpr([1, 0, 0, 0, 0], [0.5, 0.5, 0.4, 0.3, 0.2], min_tpr=0.5) == pytest.approx(0.5 - 0.25 * 0.75 / 2)


def test_partial_auc_matches_the_challenge_code() -> None:
    """The ISIC 2024 Kaggle scoring function, written out with scikit-learn, on random and tied scores."""
    from sklearn.metrics import auc
    from sklearn.metrics import roc_curve as sk_roc_curve

    def challenge(y: np.ndarray, s: np.ndarray, min_tpr: float = 0.8) -> float:
        fpr, tpr, _ = sk_roc_curve(np.abs(y - 1), -s)
        max_fpr = 1 - min_tpr
        stop = np.searchsorted(fpr, max_fpr, "right")
        tpr = np.append(tpr[:stop], np.interp(max_fpr, [fpr[stop - 1], fpr[stop]], [tpr[stop - 1], tpr[stop]]))
        return auc(np.append(fpr[:stop], max_fpr), tpr)

    rng = np.random.default_rng(0)
    for n, rate in ((50, 0.3), (2000, 0.01), (400, 0.5)):
        y = (rng.random(n) < rate).astype(int)
        y[:2] = (0, 1)
        scores = rng.random(n) + 0.7 * y
        rounded = np.round(scores, 1)  # many ties
        for s in (scores, rounded):
            assert partial_auc_above_tpr(y, s) == pytest.approx(challenge(y, s), abs=1e-12)


def test_roc_curve_and_metric_refuse_what_they_cannot_score() -> None:
    fpr, tpr = roc_curve([0, 1, 1], [0.2, 0.9, 0.1])
    assert fpr.tolist() == [0, 0, 1, 1] and tpr.tolist() == [0, 0.5, 0.5, 1]
    with pytest.raises(ValueError, match="both classes"):
        partial_auc_above_tpr([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        partial_auc_above_tpr([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="min_tpr"):
        partial_auc_above_tpr([0, 1], [0.1, 0.2], min_tpr=1.0)


# ----------------------------------------------------------------------------- label selection


def test_label_kinds_select_their_column_and_classes() -> None:
    assert set(typing.get_args(ClassifierConfig.model_fields["label"].annotation)) == set(LABELS)
    diagnosis, superclass, malignant = label_spec("diagnosis"), label_spec("superclass"), label_spec("malignant")
    assert (diagnosis.column, superclass.column, malignant.column) == ("diagnosis", "diagnosis_superclass", "malignant")
    assert diagnosis.index("MEL") == diagnosis.classes.index("MEL") and diagnosis.index(None) is None
    assert diagnosis.index("Benign") is None  # a superclass is no diagnosis
    assert superclass.index("Malignant") == superclass.classes.index("Malignant") and superclass.index(None) is None
    assert malignant.classes[malignant.index(True)] == "malignant" and malignant.index(False) == 0
    assert malignant.index(None) is None and malignant.index(float("nan")) is None
    indices, mask = diagnosis.indices(["NEV", None, "XYZ", "MEL"])
    assert mask.tolist() == [True, False, False, True] and indices.tolist() == [diagnosis.index("NEV"), diagnosis.index("MEL")]
    with pytest.raises(ValueError, match="'grade'"):
        label_spec("grade")


def test_tally_puts_every_lesion_in_exactly_one_count() -> None:
    spec = label_spec("diagnosis")
    splits = ["train", "train", "train", "train", "test", "val", None]
    values = ["MEL", None, "NEV", "MEL", None, "NEV", "MEL"]
    usable = [True, True, False, True, True, True, True]  # e.g. with a note
    t = tally(spec, splits, values, usable)
    assert t["used"] == {"train": 2, "test": 0, "val": 1, "none": 1}
    assert t["excluded_unlabelled"] == {"train": 1, "test": 1, "val": 0, "none": 0}
    assert t["unusable"] == {"train": 1, "test": 0, "val": 0, "none": 0}
    assert t["class_counts"]["train"][spec.index("MEL")] == 2 and sum(t["class_counts"]["train"]) == 2
    assert sum(sum(t[k].values()) for k in ("used", "excluded_unlabelled", "unusable")) == len(splits)


def test_balanced_class_weights() -> None:
    assert balanced_class_weights([990, 10]) == pytest.approx([1000 / (2 * 990), 1000 / (2 * 10)])
    assert balanced_class_weights([6, 0, 2]) == pytest.approx([8 / 12, 0.0, 8 / 4])  # an absent class weighs nothing
    with pytest.raises(ValueError, match="no labelled"):
        balanced_class_weights([0, 0])


# ----------------------------------------------------------------------------- reader and synthetic rows


def _isic_row(**fields) -> dict:
    row, _, _, _ = synthesize_lesion(0, 3)
    return {**{k: str(v) for k, v in row.items()}, **fields}


def test_isic_reader_keeps_rows_with_only_iddx_1() -> None:
    reader = Isic2024Reader()
    only_iddx_1 = reader.to_canonical(_isic_row(iddx_full="Benign", iddx_1="Benign", iddx_2="", iddx_3="", target="0"))
    assert only_iddx_1["diagnosis"] is None and only_iddx_1["diagnosis_superclass"] == "Benign"
    assert only_iddx_1["malignant"] is False and only_iddx_1["diagnosis_full"] == "Benign"
    malignant = reader.to_canonical(_isic_row(iddx_full="Malignant", iddx_1="malignant", iddx_2="", iddx_3="", target="1"))
    assert malignant["diagnosis"] is None and malignant["diagnosis_superclass"] == "Malignant" and malignant["malignant"] is True
    no_iddx_1 = reader.to_canonical(_isic_row(iddx_full="", iddx_1="", iddx_2="Benign melanocytic proliferations", iddx_3=""))
    assert no_iddx_1["diagnosis_superclass"] == "Benign" and no_iddx_1["diagnosis"] is None
    # ISIC 2024's finer names map to the class they start with.
    in_situ = reader.to_canonical(_isic_row(iddx_1="Malignant", iddx_3="Melanoma in situ", target="1"))
    assert in_situ["diagnosis"] == "MEL"
    unknown = reader.to_canonical(_isic_row(iddx_1="Benign", iddx_3="Lichenoid keratosis", target="0"))
    assert unknown["diagnosis"] is None and unknown["diagnosis_superclass"] == "Benign"
    with pytest.raises(RowRejected, match="iddx_1='Probably'"):
        reader.to_canonical(_isic_row(iddx_1="Probably"))
    with pytest.raises(RowRejected, match="target=2"):
        reader.to_canonical(_isic_row(target="2"))


def test_synthetic_unlabelled_rows_look_like_isic_2024() -> None:
    rows = [synthesize_lesion(0, i, image_size=32, unlabelled_fraction=0.75) for i in range(40)]
    unlabelled = [r for r, *_ in rows if not r["iddx_3"]]
    assert 20 <= len(unlabelled) <= 38
    for row in unlabelled:
        assert row["iddx_full"] == row["iddx_1"] in ("Benign", "Indeterminate", "Malignant") and row["iddx_2"] == ""
        assert row["target"] == int(row["iddx_1"] == "Malignant")
    # The lesion is the same with or without its finer labels: only the label columns differ.
    labelled_row, jpeg, _, _ = synthesize_lesion(0, 0, image_size=32)
    row, same_jpeg, _, _ = synthesize_lesion(0, 0, image_size=32, unlabelled_fraction=1.0)
    assert same_jpeg == jpeg and row["iddx_3"] == "" and labelled_row["iddx_3"]
    assert {k: v for k, v in row.items() if not k.startswith("iddx")} == {
        k: v for k, v in labelled_row.items() if not k.startswith("iddx")
    }


# ----------------------------------------------------------------------------- the chain


def test_chain_diagnosis_from_classifier_similar_cases_or_none() -> None:
    similar = [{"diagnosis": None}, {"diagnosis": "NEV"}, {"diagnosis": "MEL"}, {"diagnosis": "MEL"}, {"diagnosis": "NEV"}]
    by_classifier = chain_diagnosis({"diagnosis": {"code": "BCC", "name": "Basal cell carcinoma"}}, similar)
    assert by_classifier == {"code": "BCC", "name": "Basal cell carcinoma", "source": "classifier"}
    tie = chain_diagnosis({"diagnosis": None, "prediction": {"label": "malignant"}}, similar)
    assert tie == {"code": "NEV", "name": "Nevus", "source": "similar cases"}  # 2 : 2, NEV is the more similar
    assert chain_diagnosis({"diagnosis": None}, [{"diagnosis": None}, {"diagnosis": None}]) is None
    assert chain_diagnosis({"diagnosis": None}, []) is None


def test_classifier_tables_for_every_label_kind() -> None:
    from dermaray.grounding.evaluate import classifier_markdown as markdown

    head = {"accuracy": 0.9, "balanced_accuracy": 0.6, "macro_f1": 0.55, "pauc": 0.125}
    text = markdown(
        {
            "in-domain (test split)": {
                "label": "malignant",
                "lesions": 40,
                "excluded_unlabelled": 0,
                "image": head,
                "fused": {**head, "pauc": None},
            },
            "shifted domain": {"label": "malignant", "lesions": 0, "excluded_unlabelled": 12},
        }
    )
    assert "Label: malignant." in text and "| pAUC |" in text
    assert "| in-domain (test split) | 40 | 0 | image only | 0.900 | 0.600 | 0.550 | 0.125 |" in text
    assert "| shifted domain | 0 | 12 | image only | - | - | - | - |" in text
    old = markdown(
        {"in-domain (test split)": {"lesions": 5, "image": head, "fused": head, "image_to_note": {"P@1": 1, "mAP": 0.5}}}
    )
    assert "Label: diagnosis." in old and "pAUC" not in old  # a summary written before classifier.label


# ----------------------------------------------------------------------------- jobs on the Ray cluster

CLASS_WEIGHTS = "{NEV: 4, MEL: 2, BCC: 1, DF: 1}"


def _config(*overrides):
    return load_config(None, [f"models.cache_dir={Path('.cache/models').resolve()}", *overrides])


@pytest.fixture(scope="module")
def isic(ray_cluster, tmp_path_factory):
    """240 ISIC 2024-format lesions, three in four with only iddx_1 and target; ingested; template notes."""
    from jobs import ingest, notes, synth

    root = tmp_path_factory.mktemp("isic")
    manifest = synth.run(
        _config(
            f"synth.output={root}/synth",
            "synth.n_lesions=240",
            "synth.image_size=64",
            "synth.shard_size=120",
            "synth.unlabelled_fraction=0.75",
            f"synth.class_weights={CLASS_WEIGHTS}",
        )
    )
    summary = ingest.run(_config(f"ingest.input={root}/synth", f"ingest.output={root}/ingest", "ingest.batch_size=120"))
    notes.run(
        _config(
            "notes.strategy=M", "notes.label_hierarchy=false", f"notes.input={root}/ingest/lesions", f"notes.output={root}/notes"
        )
    )
    lesions = pq.read_table(root / "ingest" / "lesions").to_pylist()
    return {"root": root, "manifest": manifest, "ingest": summary, "lesions": lesions}


def test_ingest_keeps_lesions_without_a_diagnosis(isic) -> None:
    summary, lesions = isic["ingest"], isic["lesions"]
    assert summary["rows_in"] == summary["rows_out"] == 240 and summary["rows_quarantined"] == 0  # a missing label is no defect
    unlabelled = [r for r in lesions if r["diagnosis"] is None]
    assert len(unlabelled) == isic["manifest"]["unlabelled_rows"] and 150 <= len(unlabelled) <= 210
    assert all(
        r["diagnosis_superclass"] in ("Benign", "Indeterminate", "Malignant") and r["malignant"] is not None for r in lesions
    )
    assert all(r["malignant"] == (r["diagnosis_superclass"] == "Malignant") for r in lesions)
    assert summary["labelled"] == {"diagnosis": 240 - len(unlabelled), "superclass": 240, "malignant": 240}


def _train_classifier(isic, label: str, *overrides) -> dict:
    from jobs import classifier

    root = isic["root"]
    return classifier.run(
        _config(
            "models.text_encoder=tiny",
            f"classifier.input={root}/ingest/lesions",
            f"classifier.notes={root}/notes",
            "classifier.shifted_input=null",
            f"classifier.output={root}/{label}/classifier",
            "classifier.init_from=null",
            f"classifier.label={label}",
            "classifier.train.epochs=1",
            "classifier.train.batch_size=64",
            *overrides,
        )
    )


def _count(lesions, split, predicate) -> int:
    return sum(1 for r in lesions if r["split"] == split and predicate(r))


@pytest.fixture(scope="module")
def malignant_classifier(isic):
    return _train_classifier(isic, "malignant", "classifier.class_weights=balanced")


def test_classifier_on_malignant_reports_the_challenge_metric(isic, malignant_classifier) -> None:
    summary, lesions = malignant_classifier, isic["lesions"]
    assert summary["label"] == "malignant" and summary["classes"] == ["benign", "malignant"]
    assert summary["excluded_unlabelled"] == {"train": 0, "val": 0, "test": 0}  # `target` is on every ISIC 2024 row
    train_malignant = _count(lesions, "train", lambda r: r["malignant"])
    train_benign = _count(lesions, "train", lambda r: not r["malignant"])
    assert summary["class_counts_train"] == {"benign": train_benign, "malignant": train_malignant}
    n = train_benign + train_malignant
    assert summary["class_weights"] == pytest.approx([n / (2 * train_benign), n / (2 * train_malignant)])
    (result,) = summary["eval"].values()
    assert result["lesions"] == _count(lesions, "test", lambda r: True) > 0
    for head in ("image", "fused"):
        assert 0 <= result[head]["pauc"] <= 0.2 and 0 <= result[head]["accuracy"] <= 1
        assert len(result[head]["confusion"]) == 2
    text = (isic["root"] / "malignant" / "classifier" / "classifier_eval.md").read_text()
    assert "| pAUC |" in text and f"{result['image']['pauc']:.3f} |" in text


def test_report_renders_the_malignant_classifier_table(isic, malignant_classifier, tmp_path) -> None:
    from jobs import report

    html, found = report.build(_config(f"report.workdir={isic['root'] / 'malignant'}", f"report.output={tmp_path / 'r.html'}"))
    assert found["classifier"] and "<th>pAUC</th>" in html and "Label: malignant." in html
    assert "not in the layout this version reads" not in html


def test_diffusion_eval_refuses_a_judge_not_trained_on_diagnoses(isic, malignant_classifier, tmp_path) -> None:
    from jobs import diffusion_eval

    with pytest.raises(ValueError, match="predicts 'malignant'.*classifier.label=diagnosis"):
        diffusion_eval.run(
            _config(
                f"diffusion_eval.classifier={malignant_classifier['model']}",
                f"diffusion_eval.real={isic['root']}/ingest/lesions",
                f"diffusion.output={tmp_path}",
                f"diffusion_eval.output={tmp_path}/eval",
            )
        )


def test_classifier_on_diagnosis_excludes_and_counts_unlabelled_lesions(isic) -> None:
    summary, lesions = _train_classifier(isic, "diagnosis"), isic["lesions"]
    for split in ("train", "val", "test"):
        assert summary["excluded_unlabelled"][split] == _count(lesions, split, lambda r: r["diagnosis"] is None)
        assert summary["lesions_with_note"][split] == _count(lesions, split, lambda r: r["diagnosis"] is not None)
    assert summary["lesions_without_note"] == 0 and summary["class_weights"] is None
    assert sum(summary["class_counts_train"].values()) == summary["lesions_with_note"]["train"]
    assert summary["steps"] == -(-summary["lesions_with_note"]["train"] // 64)  # one epoch over the labelled lesions only
    (result,) = summary["eval"].values()
    assert result["lesions"] == summary["lesions_with_note"]["test"] > 0
    assert result["excluded_unlabelled"] == summary["excluded_unlabelled"]["test"] > 0
    assert "pauc" not in result["image"] and len(result["image"]["confusion"]) == 9


def test_per_diagnosis_diffusion_skips_unlabelled_lesions_and_small_classes(isic) -> None:
    from collections import Counter

    from jobs import diffusion

    lesions = isic["lesions"]
    per_class = Counter(r["diagnosis"] for r in lesions if r["split"] == "train" and r["diagnosis"])
    minimum = max(per_class.values())  # only the largest class (or the classes tied with it) get an adapter
    out = isic["root"] / "diffusion"
    summary = diffusion.run(
        _config(
            f"diffusion.input={isic['root']}/ingest/lesions",
            f"diffusion.output={out}",
            "diffusion.adapters=per_diagnosis",
            f"diffusion.min_lesions={minimum}",
            "diffusion.resolution=32",
            "diffusion.pretrain.vae_steps=0",
            "diffusion.pretrain.unet_steps=0",
            "diffusion.train.epochs=1",
            "diffusion.train.batch_size=64",
            "diffusion.train.cpus_per_worker=1",
            "diffusion.lora_rank=4",
        )
    )
    trained = {c for c, n in per_class.items() if n >= minimum}
    assert set(summary["per_diagnosis"]) == trained and len(per_class) > len(trained)
    assert {c: s["lesions_train"] for c, s in summary["skipped"].items()} == {
        c: n for c, n in per_class.items() if c not in trained
    }
    for code in trained:
        assert summary["per_diagnosis"][code]["lesions_train"] == per_class[code]
        assert summary["per_diagnosis"][code]["steps"] == -(-per_class[code] // 64)
    assert summary["lesions_without_diagnosis"] == {
        s: _count(lesions, s, lambda r: r["diagnosis"] is None) for s in ("train", "val")
    }
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(trained)  # no "None", no skipped class


def test_serve_over_a_mostly_unlabelled_gallery(isic, malignant_classifier, tmp_path_factory) -> None:
    """The chain with a malignancy classifier and similar cases without a diagnosis answers 200 (it raised
    an IndexError before); every endpoint answers 2xx or 4xx over this gallery, schemathesis's generated requests too."""
    import httpx
    import pyarrow as pa

    from dermaray.schema import LESION_SCHEMA
    from tests import serve_fixtures

    gallery = pa.Table.from_pylist(isic["lesions"], schema=LESION_SCHEMA)
    app = serve_fixtures.start(
        tmp_path_factory.mktemp("serve-isic"),
        Path(".cache/models").resolve(),
        [
            f"serve.classifier={malignant_classifier['model']}",
            f"serve.text_index={malignant_classifier['image_projections']['uri']}",  # the job's, over the same lesions
        ],
        lesions=gallery,
    )
    try:
        unlabelled = next(r for r in isic["lesions"] if r["diagnosis"] is None)
        labelled = next(r for r in isic["lesions"] if r["diagnosis"] is not None)
        with httpx.Client(base_url=app.url, headers=app.headers, timeout=120) as client:

            def upload(row):
                return {"file": ("lesion.jpg", row["image_bytes"], "image/jpeg")}

            alone = client.post("/chain", params={"k": 1, "count": 1}, files=upload(unlabelled))
            assert alone.status_code == 200, alone.text
            body = alone.json()
            assert body["similar"][0]["lesion_id"] == unlabelled["lesion_id"] and body["similar"][0]["diagnosis"] is None
            assert body["diagnosis"] is None and body["generated"] is None and "no diagnosis" in body["not_generated"]
            assert body["query"]["diagnosis"] is None and body["query"]["prediction"]["label"] == "malignant"
            assert set(body["query"]["prediction"]["probabilities"]) == {"benign", "malignant"}

            found = client.post("/chain", params={"k": 1, "count": 1}, files=upload(labelled))
            assert found.status_code == 200, found.text
            assert found.json()["diagnosis"] == {
                "code": labelled["diagnosis"],
                "name": found.json()["diagnosis"]["name"],
                "source": "similar cases",
            }
            assert len(found.json()["generated"]["images"]) == 1

            answers = {
                "search": client.post("/search", params={"k": 5}, files=upload(unlabelled)),
                "attribute": client.post("/search/attribute", params={"attribute": "area_mm2", "k": 5}, files=upload(unlabelled)),
                "text": client.post("/search/text", json={"text": "small brown symmetric lesion", "k": 5}),
                "predict": client.post("/predict", files=upload(unlabelled)),
                "lesion": client.get(f"/lesions/{unlabelled['lesion_id']}"),
                "thumbnail": client.get(f"/lesions/{unlabelled['lesion_id']}/thumbnail"),
                "info": client.get("/info"),
                "generate": client.post("/generate", json={"diagnosis": "DF", "count": 1}),
                "chain k=20": client.post("/chain", params={"k": 20, "count": 1}, files=upload(unlabelled)),
            }
            assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 200)
            assert (
                answers["lesion"].json()["diagnosis"] is None and answers["predict"].json()["prediction"]["label"] == "malignant"
            )
            missing = client.get("/lesions/ISIC_none")
            assert missing.status_code == 404
        app.schemathesis(tmp_path_factory.mktemp("schemathesis-isic"), max_seconds=30)  # and no 5xx for generated requests
    finally:
        serve_fixtures.stop()


def test_attributes_checked_a_column_at_a_time_agree_with_the_per_value_checks() -> None:
    """Rows Arrow clears get the values the per-value parse gives; rows it cannot clear are left to that parse."""
    reader = Isic2024Reader()
    good = [_isic_row(tbp_lv_areaMM2=" 12.5 "), _isic_row(tbp_lv_areaMM2="3e1")]
    bad = [_isic_row(tbp_lv_areaMM2=""), _isic_row(tbp_lv_areaMM2="inf"), _isic_row(tbp_lv_areaMM2="-4")]
    checked = reader.checked_attributes(pa.Table.from_pylist(good + bad))
    assert checked[2:] == [None, None, None]
    for row, attributes in zip(good, checked[:2], strict=True):
        assert attributes["area_mm2"] in (12.5, 30.0)
        assert reader.to_canonical(row, attributes) == reader.to_canonical(row)
    # A value Arrow cannot cast at all sends the whole batch to the per-value checks, which name the reason.
    assert reader.checked_attributes(pa.Table.from_pylist([*good, _isic_row(tbp_lv_areaMM2="12,5")])) == [None] * 3
    with pytest.raises(RowRejected, match="area_mm2=.12,5. is not a number"):
        reader.to_canonical(_isic_row(tbp_lv_areaMM2="12,5"))
