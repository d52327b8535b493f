"""The HTML report: on a small real run (synth -> ingest -> notes -> grounding -> embeddings -> eval), and on nothing."""

import base64
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from dermaray.config import load_config
from dermaray.report import adapters_per_diagnosis, line_chart, markdown_tables, pick_queries
from jobs import pipeline, report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_LEAVES = {"rect", "line", "polyline", "circle", "path"}  # written self-closed inside <svg>
EPOCHS = 2


class Page(HTMLParser):
    """Checks that every element closes in order; collects sections, images and charts."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.sections, self.images, self.links = [], {}, [], []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed: {self.stack}"
        self.svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections[a["id"]] = None
        if tag == "img":
            self.images.append(a)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        assert tag in VOID | SVG_LEAVES, tag

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def sections_of(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.S))


@pytest.fixture(scope="module")
def small_run(ray_cluster, tmp_path_factory):
    """240 lesions through every stage up to the grounding evaluation; the classifier and diffusion not run."""
    root = tmp_path_factory.mktemp("run")
    cache = Path(".cache/models").resolve()
    cfg = load_config(
        Path("configs/local.yaml").resolve(),
        [
            f"pipeline.workdir={root}",
            f"models.cache_dir={cache}",
            "synth.n_lesions=240",
            "pipeline.shifted_lesions=0",
            "notes.strategy=M",
            f"grounding.train.epochs={EPOCHS}",
            "grounding.train.cpus_per_worker=1",
            "pipeline.stages=[synth,ingest,notes,grounding,embeddings,grounding_eval,report]",
        ],
    )
    results = pipeline.run(cfg)
    return root, results, (root / "reports" / "report.html").read_text()


def test_report_is_one_valid_self_contained_page(small_run):
    root, results, text = small_run
    assert results["report"] == str(root / "reports" / "report.html")
    page = Page(text)
    assert list(page.sections) == ["run", "notes", "grounding", "retrieval", "classifier", "diffusion"]
    assert "<script" not in text
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links), "nothing may be fetched"
    for img in page.images:
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        picture.load()  # decodes every pixel
        assert picture.format == "PNG" and min(picture.size) > 0


def test_sections_hold_the_runs_figures(small_run):
    root, results, text = small_run
    parts = sections_of(text)
    ingest = json.loads((root / "ingest" / "clinic" / "ingest_summary.json").read_text())
    for value in (ingest["rows_in"], ingest["rows_out"], ingest["rows_quarantined"]):
        assert f">{value:,}<" in parts["run"]
    assert "decompression_bomb" in parts["run"]
    seconds = json.loads((root / "pipeline_summary.json").read_text())["stage_seconds"]
    assert set(seconds) == {
        "ray start",
        "synth/clinic",
        "ingest/clinic",
        "notes/clinic",
        "grounding",
        "embeddings",
        "grounding_eval",
        "report",
    }
    assert all(stage in parts["run"] for stage in seconds if stage != "report")  # the report times itself after writing
    assert "0.0%" in parts["notes"] and "Sample notes" in parts["notes"]  # template notes audit clean
    # Grounding: the eval table from its JSON, and training curves with one point per epoch.
    evaluated = json.loads((root / "reports" / "grounding" / "grounding_eval.json").read_text())
    mae = evaluated["clinic held-out (test split)"]["attributes"]["area_mm2"]["prediction"]["grounded"]["mae"]
    assert f"{mae:.3g} mm²" in parts["grounding"]
    charts = re.findall(r"<svg.*?</svg>", parts["grounding"], flags=re.S)
    assert len(charts) == 2
    for chart in charts:
        svg = ET.fromstring(chart)
        lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
        assert lines and all(len(p.get("points").split()) == EPOCHS for p in lines)
    # The gallery: each query with its top 5 under the grounded and the frozen embedding, every lesion pictured.
    queries = re.findall(r"<h4>Query (\S+):", parts["retrieval"])
    assert len(queries) == 4 and len(set(queries)) == 4
    assert parts["retrieval"].count("<img") == 4 * (1 + 2 * 5)
    assert parts["retrieval"].count(">grounded<") == parts["retrieval"].count(">frozen<") == 4
    for stage in ("classifier", "diffusion"):
        assert "not run" in parts[stage] and "<img" not in parts[stage]


def test_report_of_an_empty_workdir_says_not_run(tmp_path):
    cfg = load_config(None, [f"report.workdir={tmp_path}", f"report.output={tmp_path / 'r.html'}"])
    summary = report.run(cfg)
    assert not any(summary["sections"].values())
    parts = sections_of((tmp_path / "r.html").read_text())
    assert all("not run" in body or "not-run" in body for body in parts.values())


def test_chart_and_table_helpers():
    svg = ET.fromstring(line_chart({"train": [(1, 3.0), (2, 2.0), (3, float("nan"))], "empty": []}, "t", "epoch", log_y=True))
    assert [len(p.get("points").split()) for p in svg.iter("{http://www.w3.org/2000/svg}polyline")] == [2]
    assert "no values" in line_chart({"a": []}, "t", "epoch")
    html = markdown_tables("### A\n\n| x | y |\n|---|---|\n| 1 | b |\n\nclosing words")
    assert "<h4>A</h4>" in html and "<th>x</th>" in html and '<td class="n">1</td>' in html and "<p>closing words</p>" in html
    assert "---" not in html
    ids = [f"L{i}" for i in range(10)]
    picked = pick_queries(ids, [9, 0, 8, 1, 7, 2, 6, 3, 5, 4], 3)  # by area: L1 L3 L5 L7 L9 L8 L6 L4 L2 L0
    assert picked == ["L3", "L8", "L0"] and pick_queries(ids, list(range(10)), 0) == []


def test_per_diagnosis_adapters_get_a_row_and_a_curve_each():
    runs = {
        code: {
            "lesions_train": lesions,
            "epochs": 2,
            "steps": steps,
            "final": {"train_loss": 0.2, "val_loss": last},
            "history": [{"epoch": 1, "val_loss": 0.3}, {"epoch": 2, "val_loss": last}],
        }
        for code, lesions, steps, last in (("MEL", 40, 4, 0.21), ("VASC", 9, 2, 0.25))
    }
    html = adapters_per_diagnosis(runs, {"DF": {"lesions_train": 3, "reason": "fewer than 8 training lesions"}})
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == 2 and "VASC" in body and "0.25" in body
    assert html.count("<polyline") == 2  # one validation curve per diagnosis
    assert "No adapter for DF (3 training lesions): fewer than 8 training lesions" in html
    # An adapter summary without its final epoch (never written so, but the report must not fail on it).
    assert "MEL" in adapters_per_diagnosis({"MEL": {"lesions_train": 40}})


def test_report_reads_a_workdir_on_s3(small_run, s3_options, tmp_path):
    """A cluster run's workdir is on object storage: the same report from there."""
    import s3fs

    root, _, _ = small_run
    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(root), "dermaray/reportrun", recursive=True)
    cfg = load_config(None, ["report.workdir=s3://dermaray/reportrun", "report.output=s3://dermaray/reportrun/reports/r.html"])
    cfg.storage_options = s3_options
    summary = report.run(cfg)
    assert summary["sections"] == {
        "run": True,
        "notes": True,
        "grounding": True,
        "retrieval": True,
        "classifier": False,
        "diffusion": False,
    }
    parts = sections_of(fs.cat_file("dermaray/reportrun/reports/r.html").decode())
    assert parts["retrieval"].count("<img") == 4 * (1 + 2 * 5) and "not run" in parts["classifier"]
