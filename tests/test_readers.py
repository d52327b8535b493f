"""HAM10000 and PAD-UFES-20 folder layouts, ingested on the local Ray cluster."""

import pandas as pd
import pytest

from dermaray.config import load_config
from dermaray.data.readers import READERS, mark_duplicates, read_csv_as_text
from dermaray.data.synthetic import synthesize_lesion
from jobs import ingest


def _save(path, index, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(synthesize_lesion(5, index)[2]).save(path, format=fmt)


def _ingest(source, folder, out):
    cfg = load_config(None, [f"ingest.source={source}", f"ingest.input={folder}", f"ingest.output={out}", "ingest.batch_size=3"])
    summary = ingest.run(cfg)
    lesions = pd.read_parquet(out / "lesions")
    quarantine = pd.read_parquet(out / "quarantine")
    assert summary["rows_in"] == len(lesions) + len(quarantine)
    return lesions.set_index("lesion_id"), quarantine.set_index("lesion_id")


def _ham10000_folder(root):
    """Seven HAM10000 rows: four good, three that ingest must quarantine."""
    rows = [
        ("HAM_0000118", "ISIC_0027419", "bkl", "histo", "80.0", "male", "scalp"),
        ("HAM_0000118", "ISIC_0025030", "bkl", "histo", "80.0", "male", "scalp"),
        ("HAM_0002730", "ISIC_0026769", "mel", "histo", "", "female", "back"),
        ("HAM_0001466", "ISIC_0031633", "nv", "follow_up", "45.0", "unknown", "unknown"),
        ("HAM_0002761", "ISIC_0029176", "xyz", "histo", "60.0", "male", "face"),  # unknown dx
        ("HAM_0005132", "ISIC_0025837", "akiec", "histo", "sixty", "male", "face"),  # wrong dtype
        ("HAM_0001396", "ISIC_0025276", "df", "consensus", "55.0", "female", "trunk"),  # image absent
    ]
    pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]).to_csv(
        _mkdir(root) / "HAM10000_metadata.csv", index=False
    )
    for i, (_, image_id, *_rest) in enumerate(rows[:-1]):
        _save(root / f"HAM10000_images_part_{1 + i % 2}" / f"{image_id}.jpg", i, "JPEG")
    return [image_id for _, image_id, *_rest in rows]


def test_ham10000(ray_cluster, tmp_path):
    root = tmp_path / "ham"
    _ham10000_folder(root)
    lesions, quarantine = _ingest("ham10000", root, tmp_path / "out")
    assert len(lesions) == 4 and len(quarantine) == 3
    assert lesions.loc["ISIC_0026769", "diagnosis"] == "MEL" and lesions.loc["ISIC_0026769", "malignant"]
    assert lesions.loc["ISIC_0027419", "anatom_site"] == "head/neck"
    assert pd.isna(lesions.loc["ISIC_0031633", "sex"]) and pd.isna(lesions.loc["ISIC_0031633", "anatom_site"])
    # Two images of one lesion share a split (the lesion stands in for the patient).
    assert lesions.loc["ISIC_0027419", "split"] == lesions.loc["ISIC_0025030", "split"]
    assert quarantine.reason.to_dict() == {
        "ISIC_0029176": "invalid_value",
        "ISIC_0025837": "invalid_value",
        "ISIC_0025276": "image_missing",
    }


def test_each_batch_writes_its_own_files_in_source_order_and_a_retry_replaces_them(ray_cluster, tmp_path):
    root, out = tmp_path / "ham", tmp_path / "out"
    ids = _ham10000_folder(root)
    _ingest("ham10000", root, out)  # batches of 3 rows: files part-0, part-3, part-6
    assert sorted(p.name for p in (out / "lesions").iterdir()) == [f"part-{i:012d}.parquet" for i in (0, 3)]
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == [f"part-{i:012d}.parquet" for i in (3, 6)]
    kept = pd.read_parquet(out / "lesions").lesion_id.tolist()
    assert kept == [i for i in ids if i in kept]  # the table reads in source order

    # A retry of batch 0 that quarantines all its rows (say the limit changed between attempts) leaves no
    # lesion file of the first attempt behind; the attempt after that removes its quarantine file again.
    reader = READERS["ham10000"]
    metadata = mark_duplicates(reader.load_metadata(str(root), {}), reader.id_column)
    cfg = load_config(None, ["ingest.source=ham10000", f"ingest.input={root}", f"ingest.output={out}"]).ingest
    strict = cfg.model_copy(update={"max_image_bytes": 1})
    assert ingest.ingest_batch(metadata, 0, 3, strict, {}) == {"lesions": 0, "quarantine": 3}
    assert not (out / "lesions" / "part-000000000000.parquet").exists()
    assert pd.read_parquet(out / "quarantine" / "part-000000000000.parquet").reason.tolist() == ["image_too_large"] * 3
    assert ingest.ingest_batch(metadata, 0, 3, cfg, {}) == {"lesions": 3, "quarantine": 0}
    assert not (out / "quarantine" / "part-000000000000.parquet").exists()
    assert pd.read_parquet(out / "lesions" / "part-000000000000.parquet").lesion_id.tolist() == ids[:3]


def test_pad_ufes_20(ray_cluster, tmp_path):
    root = tmp_path / "pad"
    (root / "images").mkdir(parents=True)
    header = [
        "patient_id",
        "lesion_id",
        "smoke",
        "age",
        "gender",
        "region",
        "diameter_1",
        "diameter_2",
        "diagnostic",
        "img_id",
        "biopsed",
    ]
    rows = [
        ["PAT_1516", "1765", "False", "8", "FEMALE", "ARM", "6.0", "5.0", "NEV", "PAT_1516_1765_530.png", "False"],
        ["PAT_46", "881", "False", "55", "MALE", "NECK", "", "", "BCC", "PAT_46_881_939.png", "True"],
        ["PAT_46", "882", "False", "55", "MALE", "NECK", "-4", "3", "BCC", "PAT_46_882_940.png", "True"],  # negative size
        ["PAT_9", "12", "False", "70", "MALE", "FACE", "8", "6", "ACK", "PAT_9_12_50.png", "True"],  # not an image
        ["PAT_9", "12", "False", "70", "MALE", "FACE", "8", "6", "ACK", "PAT_9_12_50.png", "True"],  # duplicate
    ]
    pd.DataFrame(rows, columns=header).to_csv(root / "metadata.csv", index=False)
    for i, row in enumerate(rows[:3]):
        _save(root / "images" / row[9], i, "PNG")
    (root / "images" / "PAT_9_12_50.png").write_bytes(b"not a png")
    lesions, quarantine = _ingest("pad_ufes_20", root, tmp_path / "out")
    assert list(lesions.index) == ["PAT_1516_1765_530.png", "PAT_46_881_939.png"]
    nev = lesions.loc["PAT_1516_1765_530.png"]
    assert (nev.diagnosis, nev.sex, nev.anatom_site, nev.long_diam_mm, nev.minor_axis_mm, nev.image_format) == (
        "NEV",
        "female",
        "upper extremity",
        6.0,
        5.0,
        "PNG",
    )
    assert sorted(quarantine.reason) == ["duplicate_id", "invalid_value", "not_an_image"]


@pytest.mark.parametrize("source", ["ham10000", "pad_ufes_20"])
def test_metadata_without_required_columns_fails_clearly(tmp_path, source):
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    from dermaray.data.readers import READERS, MissingColumnsError

    with pytest.raises(MissingColumnsError, match="lacks required columns"):
        READERS[source].load_metadata(str(tmp_path), {})


def _mkdir(path):
    path.mkdir(parents=True)
    return path


def test_metadata_csv_reaches_validation_as_written(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes('\ufeffid,age,note\n1,NaN,"a, b"\n2,NA,"two\nlines"\n3,,forty\n'.encode())
    assert read_csv_as_text(str(path), {}).to_pylist() == [
        {"id": "1", "age": "NaN", "note": "a, b"},
        {"id": "2", "age": "NA", "note": "two\nlines"},
        {"id": "3", "age": "", "note": "forty"},
    ]
    # A short row keeps its place with its missing fields blank (checked later, row by row), and a repeated
    # column name is kept apart.
    path.write_text("id,age,age\n1,40,41\n2\n")
    assert read_csv_as_text(str(path), {}).to_pylist() == [
        {"id": "1", "age": "40", "age.1": "41"},
        {"id": "2", "age": "", "age.1": ""},
    ]
