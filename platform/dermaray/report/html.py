"""HTML building blocks for a self-contained report: tables, markdown tables, SVG charts, inlined images.

Everything returns HTML text; images become base64 `data:` URIs, charts inline SVG, so the page
is one file that opens offline, needs no script and no network.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dermaray.images import decode_rgb

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { border-bottom: 2px solid #444; padding-bottom: 4px; }
h2 { border-bottom: 1px solid #bbb; margin-top: 36px; padding-bottom: 2px; }
h3 { margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.not-run { color: #888; font-style: italic; }
.figures { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; text-align: center; }
.gallery { border-collapse: collapse; }
.gallery td { text-align: center; vertical-align: top; font-size: 11px; border: none; padding: 3px; }
.gallery td.label { text-align: right; font-weight: bold; vertical-align: middle; padding-right: 8px; }
.gallery td.query { vertical-align: middle; padding-right: 14px; } .gallery td.query img { outline: 3px solid #1f77b4; }
.note { font-family: monospace; font-size: 12px; background: #f7f7f7; padding: 6px; white-space: pre-wrap; }
.wide { overflow-x: auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as people read it in a table: 3 significant digits, integers whole."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?\s*(%|mm²|mm|±.*)?|nan", text.strip()))


def cell(value: Any) -> str:
    text = fmt(value)
    return f'<td class="n">{esc(text)}</td>' if _numeric(text) else f"<td>{esc(text)}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def key_values(pairs: Mapping[str, Any]) -> str:
    return table(["", ""], [(k, v) for k, v in pairs.items()]).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def markdown_tables(text: str) -> str:
    """The markdown the jobs write (pipe tables, `###` headings, paragraphs) as HTML."""
    out, block = [], []

    def flush() -> None:
        if block:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
            rows = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(table(cells[0], rows))
            block.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h4>{esc(line.lstrip('#').strip())}</h4>")
        elif line.strip():
            out.append(f"<p>{esc(line.strip())}</p>")
    flush()
    return "\n".join(out)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{png_data_uri(png)}" alt="{esc(alt)}"{size}>'


def thumbnail_png(data: bytes, size: int) -> bytes:
    """Any encoded image -> a PNG of at most `size` px per side."""
    img = decode_rgb(data)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    if integer:  # epochs and steps: no tick between two whole numbers
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str = "",
    width: int = 440,
    height: int = 260,
    log_y: bool = False,
) -> str:
    """Inline SVG: one polyline with markers per series, axes with ticks, a legend."""
    series = {
        k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        for k, v in series.items()
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f'<p class="not-run">{esc(title)}: no values</p>'
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs = [x for v in series.values() for x, _ in v]
    ys = [ty(y) for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 58, 12, 40, 42
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    # On a log axis the ticks are round values of the data, placed at their logarithm.
    y_ticks = [math.log10(t) for t in _ticks(10**y0, 10**y1) if t > 0] if log_y else _ticks(y0, y1)
    for t in y_ticks:
        y = top + (1 - (t - y0) / (y1 - y0)) * ph
        label = fmt(round(10**t, 10)) if log_y else fmt(round(t, 10))
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>'
        )
    for t in _ticks(x0, x1, 8, integer=all(float(x).is_integer() for x in xs)):
        x = px(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#888"/>'
            f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{esc(fmt(round(t, 10)))}</text>'
        )
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>')
    if y_label:
        parts.append(
            f'<text x="12" y="{top + ph / 2:.0f}" text-anchor="middle" transform="rotate(-90 12 {top + ph / 2:.0f})">'
            f"{esc(y_label + (' (log)' if log_y else ''))}</text>"
        )
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        if len(points) <= 60:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
        # The legend in a row above the plot, where it never hides a curve.
        lx = left + sum(30 + 6.2 * len(n) for n in list(series)[:i])
        parts.append(
            f'<line x1="{lx:.0f}" y1="{top - 10}" x2="{lx + 18:.0f}" y2="{top - 10}" stroke="{colour}" stroke-width="2"/>'
            f'<text x="{lx + 22:.0f}" y="{top - 6}">{esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def not_run(stage: str, expected: str) -> str:
    return f'<p class="not-run">{esc(stage)}: not run (no {esc(expected)}).</p>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """sections: (anchor, title, body HTML)."""
    toc = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t, _ in sections)
    body = "\n".join(section(a, t, b) for a, t, b in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p>{esc(subtitle)}</p>"
        f"<nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n"
    )
