"""The pipeline's HTML report: one self-contained file from what every stage wrote."""

from dermaray.report.html import line_chart, markdown_tables, page, table, thumbnail_png
from dermaray.report.sections import (
    GalleryItem,
    GalleryRow,
    adapters_per_diagnosis,
    gallery,
    neighbours,
    notes,
    pick_queries,
    run_summary,
    training,
)

__all__ = [
    "GalleryItem",
    "GalleryRow",
    "adapters_per_diagnosis",
    "gallery",
    "line_chart",
    "markdown_tables",
    "neighbours",
    "notes",
    "page",
    "pick_queries",
    "run_summary",
    "table",
    "thumbnail_png",
    "training",
]
