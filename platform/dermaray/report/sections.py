"""The report's sections, each from what one stage wrote (its summary dicts, tables, images).

Every function takes the stage's outputs already loaded, or None where the stage did not run,
and returns HTML; a stage that did not run gives a "not run" line, never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermaray.config import STAGES
from dermaray.layout import summary_name
from dermaray.report.html import esc, fmt, image, key_values, line_chart, markdown_tables, not_run, table

PIPELINE_ORDER = ("ray start", *STAGES)


def _stage_rank(name: str) -> int:
    stage = name.split("/")[0]
    return PIPELINE_ORDER.index(stage) if stage in PIPELINE_ORDER else len(PIPELINE_ORDER)


def run_summary(pipeline: dict | None, ingest: Mapping[str, dict | None], synth: Mapping[str, dict | None]) -> str:
    """Lesions in / out / quarantined per domain with the reasons, and wall time per stage."""
    parts = []
    rows = []
    for domain in sorted(set(ingest) | set(synth)):
        s, i = synth.get(domain), ingest.get(domain)
        rows.append(
            [
                domain,
                s["n_lesions"] if s else "",
                len(s["planted"]) if s else "",
                i["rows_in"] if i else "not run",
                i["rows_out"] if i else "",
                i["rows_quarantined"] if i else "",
            ]
        )
    if rows:
        parts.append(table(["domain", "lesions rendered", "planted bad rows", "rows in", "rows out", "quarantined"], rows))
        reasons = sorted({r for i in ingest.values() if i for r in i["quarantine_reasons"]})
        if reasons:
            domains = [d for d, i in ingest.items() if i]
            parts.append("<h3>Quarantine reasons</h3>")
            parts.append(
                table(["reason", *domains], [[r, *(ingest[d]["quarantine_reasons"].get(r, 0) for d in domains)] for r in reasons])
            )
    else:
        parts.append(not_run("synth / ingest", "ingest summary"))
    seconds = (pipeline or {}).get("stage_seconds")
    if seconds:  # in the order the pipeline runs them (the summary's keys are sorted)
        seconds = dict(sorted(seconds.items(), key=lambda kv: (_stage_rank(kv[0]), kv[0])))
        total = sum(seconds.values())
        parts.append("<h3>Wall time per stage</h3>")
        parts.append(
            table(
                ["stage", "seconds", "share"],
                [[k, round(v, 1), f"{v / total:.0%}"] for k, v in seconds.items()] + [["total", round(total, 1), "100%"]],
            )
        )
    if (pipeline or {}).get("resumed"):  # skipped by the pipeline's resume: not in the wall times above
        parts.append(f"<p>Complete from an earlier run, not run again: {esc(', '.join(pipeline['resumed']))}.</p>")
    if pipeline is None:
        parts.append('<p class="not-run">No pipeline_summary.json: the stages ran one by one, not as the pipeline job.</p>')
    return "\n".join(parts)


def notes(summaries: Mapping[str, dict | None], samples: Mapping[str, Sequence[dict]]) -> str:
    """Per notes output: hallucination rate, throughput, audit flags; a few notes as written."""
    done = {k: v for k, v in summaries.items() if v}
    if not done:
        return not_run("notes", summary_name("notes"))
    rows = []
    for name, s in done.items():
        seconds = s.get("seconds_this_run") or 0
        written = s.get("shards_written_now", 1)
        rate = s["notes"] / seconds if seconds and written else None  # a re-run that wrote nothing has no rate
        by_model = s.get("notes_by_model", s["notes"])
        model_rate = s.get("hallucination_rate_model_notes")
        rows.append(
            [
                name,
                s.get("prompt_id", s.get("strategy", "")),
                s["lesions"],
                by_model,
                s.get("notes_by_template", 0),
                s.get("errors", 0),
                f"{s['hallucination_rate']:.1%}",
                f"{model_rate:.1%}" if model_rate is not None else "",
                s.get("cut_at_max_tokens", ""),
                s.get("output_tokens", ""),
                s.get("dtype") or "",
                round(seconds, 1),
                round(rate, 1) if rate else "",
                s.get("engine_start_seconds", ""),
            ]
        )
    parts = [
        table(
            [
                "output",
                "prompt",
                "lesions",
                "notes by the model",
                "template notes",
                "errors",
                "hallucinated",
                "hallucinated (model's notes)",
                "cut at max_tokens",
                "output tokens",
                "dtype",
                "seconds",
                "notes / s",
                "engine start s",
            ],
            rows,
        ),
        "<p>The model writes the notes of <code>notes.model_lesions</code> lesions (the test split first); the "
        "others get the template note from the same metadata (strategy M). Each note row records which "
        "(<code>model_id</code>, <code>prompt_id</code>).</p>",
    ]
    flags = sorted({f for s in done.values() for f in s.get("audit_flag_counts", {})})
    if flags:
        parts.append("<h3>Audit flags (notes contradicting the lesion's metadata, by kind)</h3>")
        parts.append(
            table(["flag", *done], [[f, *(s.get("audit_flag_counts", {}).get(f, 0) for s in done.values())] for f in flags])
        )
    for name, rows_ in samples.items():
        if rows_:
            parts.append(f"<h3>Sample notes: {esc(name)}</h3>")
            for r in rows_:
                flags_ = ", ".join(r.get("audit_flags") or []) or "none"
                parts.append(
                    f"<p><b>{esc(r['lesion_id'])}</b> ({esc(r.get('model_id') or '')}; audit flags: {esc(flags_)})</p>"
                    f'<div class="note">{esc(r.get("note") or r.get("error") or "")}</div>'
                )
    return "\n".join(parts)


def curves(history: Sequence[dict], title: str, keys: Mapping[str, str], y_label: str, log_y: bool = False) -> str:
    """A chart of `history` (one dict per epoch) for `keys` (label -> history key) against the epoch."""
    series = {label: [(h["epoch"], h[k]) for h in history if h.get(k) is not None] for label, k in keys.items()}
    return line_chart(series, title, "epoch", y_label, log_y=log_y)


def training(summary: dict | None, stage: str, charts: Sequence[tuple[str, Mapping[str, str], str, bool]]) -> str:
    """Run facts and per-epoch curves of a Ray Train job's summary (`history`: one dict per epoch)."""
    if not summary:
        return not_run(stage, summary_name(stage))
    history = summary.get("history") or []
    facts = {
        "epochs": summary.get("epochs"),
        "optimizer steps": summary.get("steps"),
        "resumed from epoch": summary.get("resumed_from_epoch", history[-1].get("started_at_epoch") if history else None),
        "seconds (this run)": summary.get("seconds_this_run"),
    }
    facts.update({k: summary[k] for k in ("base", "tune", "resolution", "lesions_train", "label") if k in summary})
    figures = [curves(history, title, keys, y, log_y) for title, keys, y, log_y in charts]
    return (
        key_values({k: fmt(v) for k, v in facts.items() if v is not None}) + '<div class="figures">' + "".join(figures) + "</div>"
    )


def adapters_per_diagnosis(per_diagnosis: Mapping[str, dict], skipped: Mapping[str, dict] | None = None) -> str:
    """One row per diagnosis' adapter (`jobs.diffusion` with diffusion.adapters=per_diagnosis: each its own Ray
    Train run and summary) and their validation curves in one chart; the diagnoses it `skipped`, with why."""
    finals = {code: s.get("final") or {} for code, s in per_diagnosis.items()}
    rows = [
        [
            code,
            s.get("lesions_train"),
            s.get("epochs"),
            s.get("steps"),
            finals[code].get("train_loss"),
            finals[code].get("val_loss"),
            s.get("seconds"),
        ]
        for code, s in per_diagnosis.items()
    ]
    series = {
        code: [(h["epoch"], h["val_loss"]) for h in s.get("history") or [] if h.get("val_loss") is not None]
        for code, s in per_diagnosis.items()
    }
    header = [
        "diagnosis",
        "training lesions",
        "epochs",
        "optimizer steps",
        "final train loss",
        "final validation loss",
        "seconds",
    ]
    missing = "".join(
        f"<p>No adapter for {esc(code)} ({s.get('lesions_train')} training lesions): {esc(s.get('reason', ''))}</p>"
        for code, s in (skipped or {}).items()
    )
    return (
        "<h4>One adapter per diagnosis</h4>"
        + table(header, rows)
        + missing
        + '<div class="figures">'
        + line_chart(series, "LoRA validation loss, per diagnosis", "epoch", "loss")
        + "</div>"
    )


@dataclass
class GalleryItem:
    lesion_id: str
    diagnosis: str | None  # None: the lesion has no diagnosis (most ISIC 2024 lesions)
    area_mm2: float
    score: float | None  # cosine similarity to the query; None for the query itself
    thumbnail: bytes | None  # PNG


@dataclass
class GalleryRow:
    query: GalleryItem
    neighbours: dict[str, list[GalleryItem]]  # embedding name -> its top k, best first


def pick_queries(lesion_ids: Sequence[str], areas: Sequence[float], n: int) -> list[str]:
    """`n` lesions spread over the area range (quantiles), so the gallery shows small to large queries."""
    if n <= 0 or not len(lesion_ids):
        return []
    order = np.argsort(np.asarray(areas, dtype=float), kind="stable")
    picks = np.linspace(0.1, 0.95, n) if n > 1 else [0.5]
    chosen = list(dict.fromkeys(int(order[round(q * (len(order) - 1))]) for q in picks))
    return [lesion_ids[i] for i in chosen]


def neighbours(index: Any, vectors: np.ndarray, query_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Top `k` of a dermaray.retrieval.VectorIndex per query vector, the query itself left out."""
    hits = index.search_ids(vectors, k + 1)
    return [[(i, s) for i, s in found if i != q][:k] for q, found in zip(query_ids, hits, strict=True)]


def gallery(rows: Sequence[GalleryRow], thumb_px: int) -> str:
    """One table per query: the query, then one row of neighbours per embedding."""
    if not rows:
        return not_run("retrieval gallery", "grounded embeddings and index")

    def cell(item: GalleryItem, css: str = "") -> str:
        picture = image(item.thumbnail, item.lesion_id, thumb_px) if item.thumbnail else "(no image)"
        score = "" if item.score is None else f"<br>cos {item.score:.4f}"
        return f'<td class="{css}">{picture}<br>{esc(item.diagnosis or "no diagnosis")}<br>{item.area_mm2:.1f} mm²{score}</td>'

    parts = []
    for row in rows:
        q = row.query
        parts.append(f"<h4>Query {esc(q.lesion_id)}: {esc(q.diagnosis or 'no diagnosis')}, {q.area_mm2:.1f} mm²</h4>")
        lines = []
        for n, (name, items) in enumerate(row.neighbours.items()):
            mean_delta = np.mean([abs(i.area_mm2 - q.area_mm2) for i in items]) if items else float("nan")
            same = sum(q.diagnosis is not None and i.diagnosis == q.diagnosis for i in items)
            label = f"{esc(name)}<br><small>mean |Δ area| {mean_delta:.1f} mm²<br>same diagnosis {same}/{len(items)}</small>"
            query = cell(q, "query").replace("<td ", f'<td rowspan="{len(row.neighbours)}" ', 1) if n == 0 else ""
            lines.append(f'<tr>{query}<td class="label">{label}</td>{"".join(cell(i) for i in items)}</tr>')
        parts.append(f'<table class="gallery">{"".join(lines)}</table>')
    return "\n".join(parts)


def markdown_section(results: dict | None, stage: str, expected: str, render: Callable[[dict], str]) -> str:
    """A stage's results JSON through the stage's own markdown renderer (one table layout, in .md and here)."""
    if not results:
        return not_run(stage, expected)
    try:
        return markdown_tables(render(results))
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # written by another version of the stage
        return (
            f'<p class="not-run">{esc(stage)}: {esc(expected)} is not in the layout this version reads '
            f"({esc(type(exc).__name__)}: {esc(exc)}); re-run the stage.</p>"
        )


def images(pngs: Mapping[str, bytes | None], width: int | None = None) -> str:
    shown = [
        f"<figure>{image(data, name, width)}<figcaption>{esc(name)}</figcaption></figure>" for name, data in pngs.items() if data
    ]
    return '<div class="figures">' + "".join(shown) + "</div>" if shown else ""
