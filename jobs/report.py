"""The HTML report of a pipeline run: every stage's figures in one self-contained file.

    python -m jobs.report --config configs/local.yaml report.workdir=out

Reads what the stages wrote under `report.workdir` (local or s3://): ingest and notes
summaries, training histories, the grounding, classifier and diffusion evaluation JSON, the
embeddings and their index (retrieval galleries), the lesion images and the diffusion grids;
writes one HTML file (default `<workdir>/reports/report.html`) with images inlined as PNG data
URIs and charts as inline SVG, readable offline with no script. A stage that did not run gets
a "not run" line. The work is reading a few files on the driver: no cluster needed.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dermaray import report
from dermaray.cli import config_from_argv, setup_logging
from dermaray.config import DermarayConfig
from dermaray.layout import MAIN_DOMAIN, Layout, embeddings_index, embeddings_table, summary_name, summary_uri
from dermaray.notes.engine import TEMPLATE_MODEL_ID
from dermaray.report.sections import images, markdown_section
from dermaray.retrieval import VectorIndex
from dermaray.storage import arrow_filesystem, filesystem, join, parquet_files, read_bytes, write_bytes
from jobs.common import log


class Workdir:
    """Reads a pipeline workdir, at URIs its `Layout` (`self.at`) names; anything missing is None."""

    def __init__(self, root: str, storage_options: dict):
        self.at, self.options = Layout(root.rstrip("/")), storage_options
        self.fs, path = filesystem(root, storage_options)
        self.path = path.rstrip("/")

    def _path(self, uri: str) -> str:
        """The filesystem path of a URI under the workdir."""
        if not uri.startswith(self.at.root):
            raise ValueError(f"{uri} is not under the workdir {self.at.root}")
        return self.path + uri[len(self.at.root) :]

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._path(uri))

    def json(self, uri: str) -> dict | None:
        return json.loads(read_bytes(uri, self.options)) if self.exists(uri) else None

    def bytes(self, uri: str) -> bytes | None:
        return read_bytes(uri, self.options) if self.exists(uri) else None

    def domains(self, uri: str) -> list[str]:
        """Sub-folders of `uri` (the pipeline writes one per domain), main domain first."""
        if not self.exists(uri):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(uri), detail=False) if self.fs.isdir(p))
        return sorted(names, key=lambda n: n != MAIN_DOMAIN)

    def names(self, uri: str, pattern: str) -> list[str]:
        """Files matching `pattern` (one `*`) in a folder, by the part the `*` stands for."""
        head, tail = pattern.split("*")
        found = self.fs.glob(join(self._path(uri), pattern)) if self.exists(uri) else []
        return [p.rsplit("/", 1)[-1][len(head) : -len(tail) or None] for p in found]

    def table(self, uri: str, columns: list[str], filters: Any = None):
        fs, path = arrow_filesystem(uri, self.options)
        return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def _gallery(w: Workdir, n_queries: int, k: int, thumb_px: int) -> list[report.GalleryRow]:
    """Held-out queries spread over lesion area, with their neighbours under the grounded and the frozen embedding."""
    embedded = {
        name: w.at.embeddings(name, MAIN_DOMAIN)
        for name in ("grounded", "frozen")
        if w.exists(join(embeddings_index(w.at.embeddings(name, MAIN_DOMAIN)), "meta.json"))
    }
    if "grounded" not in embedded or n_queries <= 0:
        return []
    meta = w.table(embeddings_table(embedded["grounded"]), columns=["lesion_id", "split", "diagnosis", "area_mm2"]).to_pandas()
    held_out = meta[meta.split == "test"]
    queries = report.pick_queries(held_out.lesion_id.tolist(), held_out.area_mm2.tolist(), n_queries)
    if not queries:
        return []
    found: dict[str, list[list[tuple[str, float]]]] = {}
    for name, output in embedded.items():
        rows = w.table(
            embeddings_table(output), columns=["lesion_id", "embedding"], filters=[("lesion_id", "in", queries)]
        ).to_pydict()
        by_id = dict(zip(rows["lesion_id"], rows["embedding"], strict=True))
        vectors = np.asarray([by_id[q] for q in queries], dtype=np.float32)
        found[name] = report.neighbours(VectorIndex.load(embeddings_index(output), w.options), vectors, queries, k)
    shown = set(queries) | {i for hits in found.values() for row in hits for i, _ in row}
    pictures = {}
    if w.exists(w.at.lesions(MAIN_DOMAIN)):
        images_ = w.table(
            w.at.lesions(MAIN_DOMAIN), columns=["lesion_id", "image_bytes"], filters=[("lesion_id", "in", sorted(shown))]
        ).to_pydict()
        pictures = {
            i: report.thumbnail_png(b, thumb_px) for i, b in zip(images_["lesion_id"], images_["image_bytes"], strict=True) if b
        }
    facts = meta.set_index("lesion_id")

    def item(lesion_id: str, score: float | None) -> report.GalleryItem:
        row = facts.loc[lesion_id]
        diagnosis = row.diagnosis if isinstance(row.diagnosis, str) else None  # most ISIC 2024 lesions have none
        return report.GalleryItem(lesion_id, diagnosis, float(row.area_mm2), score, pictures.get(lesion_id))

    return [
        report.GalleryRow(item(q, None), {name: [item(i, s) for i, s in hits[n]] for name, hits in found.items()})
        for n, q in enumerate(queries)
    ]


def _note_samples(w: Workdir, uri: str, n: int) -> list[dict]:
    """`n` notes of the first shard, the model's before the template's: what the note writer actually wrote."""
    if n <= 0 or not w.exists(uri):
        return []
    try:
        fs, files = parquet_files(uri, w.options)
    except FileNotFoundError:
        return []
    with fs.open(files[0], "rb") as f:
        rows = pq.read_table(f, columns=["lesion_id", "model_id", "note", "error", "audit_flags"]).to_pylist()
    return sorted(rows, key=lambda r: r["model_id"] == TEMPLATE_MODEL_ID)[:n]


def build(cfg: DermarayConfig) -> tuple[str, dict[str, bool]]:
    """(the report's HTML, section -> whether its stage's outputs were found)."""
    # Imported when a report is built, not with this module: the evaluation modules bring torch and scipy.
    from dermaray.diffusion.evaluate import markdown as diffusion_markdown
    from dermaray.grounding.evaluate import classifier_markdown
    from dermaray.grounding.evaluate import markdown as grounding_markdown
    from dermaray.grounding.study import markdown as grounding_study_markdown
    from dermaray.notes.study import classifier_markdown as notes_classifier_markdown
    from dermaray.notes.study import markdown as notes_study_markdown

    r = cfg.report
    w = Workdir(r.workdir, cfg.storage_options)
    at = w.at
    pipeline = w.json(at.summary)
    ingest = {d: w.json(summary_uri(at.ingest(d), "ingest")) for d in w.domains(at.ingest())}
    synth = {d: w.json(join(at.synthetic(d), "synth_manifest.json")) for d in w.domains(at.synthetic())}
    notes_folders = {"notes": at.notes, "notes_blind": at.notes_blind}
    notes_outputs = {f"{name}/{d}": folder(d) for name, folder in notes_folders.items() for d in w.domains(folder())}
    notes_summaries = {name: w.json(summary_uri(uri, "notes")) for name, uri in notes_outputs.items()}
    samples = {name: _note_samples(w, uri, r.sample_notes) for name, uri in notes_outputs.items() if name.startswith("notes/")}
    notes_study = w.json(join(at.notes_study, "notes_study.json"))  # benchmarks/notes_study.py, when run
    notes_classifier = w.json(
        join(at.classifier_notes_study, "classifier_notes_study.json")
    )  # benchmarks/classifier_notes_study.py
    grounding = w.json(summary_uri(at.grounding, "grounding"))
    grounding_eval = w.json(join(at.grounding_eval, "grounding_eval.json"))
    grounding_study = w.json(join(at.grounding_study, "grounding_study.json"))  # benchmarks/study.py
    classifier = w.json(summary_uri(at.classifier, "classifier"))
    diffusion = w.json(summary_uri(at.diffusion, "diffusion"))
    diffusion_eval = w.json(join(at.diffusion_eval, "diffusion_eval.json"))
    rows = _gallery(w, r.gallery_queries, r.gallery_k, r.thumbnail_px)

    per_diagnosis = (diffusion or {}).get("per_diagnosis")  # each adapter its own run: no top-level curves
    lora_loss = ("LoRA denoising loss", {"train": "train_loss", "validation": "val_loss"}, "loss", False)
    diffusion_body = report.training(diffusion, "diffusion", [] if per_diagnosis else [lora_loss])
    if per_diagnosis:
        diffusion_body += report.adapters_per_diagnosis(per_diagnosis, diffusion.get("skipped"))
    if diffusion and diffusion.get("pretrain"):
        pre = diffusion["pretrain"]
        if isinstance(pre, dict) and isinstance(pre.get("history"), list):
            diffusion_body += report.line_chart(
                {k: [(h["step"], h[k]) for h in pre["history"] if k in h] for k in ("vae", "unet")},
                "tiny base pre-training",
                "step",
                "loss",
            )
        elif isinstance(pre, dict):
            diffusion_body += "<h4>Tiny base pre-training, final losses</h4>" + report.table(
                ["loss", "value"], [[k, v] for k, v in pre.items() if isinstance(v, (int, float))]
            )
    diffusion_body += "<h3>Base vs LoRA vs image-guided</h3>" + markdown_section(
        diffusion_eval, "diffusion_eval", "diffusion_eval.json", diffusion_markdown
    )
    captions = {
        "base": "base (no adapter)",
        "lora": "LoRA adapter",
        "guided": "LoRA adapter, drawn from held-out lesions (pairs: guide, generated)",
        "ip_adapter": "LoRA adapter + IP-Adapter, the held-out lesion as image prompt (pairs: guide, generated)",
    }
    grids = {
        captions.get(name, name): w.bytes(join(at.diffusion_eval, f"grid_{name}.png"))
        for name in sorted(w.names(at.diffusion_eval, "grid_*.png"), key=lambda n: (n not in captions, n))
    }
    diffusion_body += images(grids)

    sections = [
        ("run", "Run summary", report.run_summary(pipeline, ingest, synth)),
        (
            "notes",
            "Clinical notes",
            report.notes(notes_summaries, samples)
            + (
                "<h3>Prompt strategies on the same lesions (benchmarks/notes_study.py)</h3>"
                + markdown_section(notes_study, "notes study", "notes_study.json", notes_study_markdown)
                if notes_study
                else ""
            ),
        ),
        (
            "grounding",
            "Grounding",
            report.training(
                grounding,
                "grounding",
                [
                    ("attribute loss (z space)", {"train": "train_loss", "validation": "val_loss"}, "Huber loss", True),
                    ("validation MAE, area", {"area mm²": "val_mae_area_mm2"}, "mm²", False),
                ],
            )
            + "<h3>Frozen vs grounded embedding</h3>"
            + markdown_section(grounding_eval, "grounding_eval", "grounding_eval.json", grounding_markdown)
            + (
                "<h3>Pretrained vs random tower, photometric augmentation (benchmarks/study.py)</h3>"
                + markdown_section(grounding_study, "grounding study", "grounding_study.json", grounding_study_markdown)
                if grounding_study
                else ""
            ),
        ),
        ("retrieval", "Retrieval gallery (held-out queries, top 5 by cosine)", report.gallery(rows, r.thumbnail_px)),
        (
            "classifier",
            "Image + note classifier",
            report.training(
                classifier,
                "classifier",
                [
                    ("training loss (CLIP + cross-entropy)", {"train": "train_loss"}, "loss", False),
                    (
                        "validation accuracy",
                        {"image only": "val_accuracy_image", "image + note": "val_accuracy_fused"},
                        "accuracy",
                        False,
                    ),
                    *(
                        [
                            (
                                "validation pAUC above 80% TPR",
                                {"image only": "val_pauc_image", "image + note": "val_pauc_fused"},
                                "pAUC",
                                False,
                            )
                        ]
                        if (classifier or {}).get("label") == "malignant"
                        else []
                    ),
                ],
            )
            + "<h3>Evaluation</h3>"
            + markdown_section((classifier or {}).get("eval"), "classifier", summary_name("classifier"), classifier_markdown)
            + (
                "<h3>Template notes vs LLM notes (benchmarks/classifier_notes_study.py)</h3>"
                + markdown_section(
                    notes_classifier, "classifier notes study", "classifier_notes_study.json", notes_classifier_markdown
                )
                if notes_classifier
                else ""
            ),
        ),
        ("diffusion", "Diffusion LoRA", diffusion_body),
    ]
    found = {
        "run": bool(ingest),
        "notes": any(notes_summaries.values()),
        "grounding": bool(grounding and grounding_eval),
        "retrieval": bool(rows),
        "classifier": bool(classifier),
        "diffusion": bool(diffusion and diffusion_eval),
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return report.page("dermaray pipeline report", f"Outputs under {r.workdir}, report written {stamp}.", sections), found


def run(cfg: DermarayConfig) -> dict:
    output = cfg.report.output or Layout(cfg.report.workdir).report
    text, found = build(cfg)
    write_bytes(output, text.encode(), cfg.storage_options)
    log.info("report: %s (%d KiB); sections with outputs: %s", output, len(text) // 1024, [k for k, v in found.items() if v])
    return {"output": output, "bytes": len(text), "sections": found}


if __name__ == "__main__":
    setup_logging()
    run(config_from_argv(sys.argv[1:], prog="python -m jobs.report"))
