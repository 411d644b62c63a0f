"""Small charts as inline SVG, drawn on the server: no JavaScript library, nothing fetched at run time."""

from __future__ import annotations

from html import escape

from markupsafe import Markup


def bars(values: list[float], title: str, width: int = 300, height: int = 60, color: str = "#3b6ea8") -> Markup:
    """A bar chart of equally spaced values (oldest left), with its maximum written in the corner."""
    top = max(values) if values and max(values) > 0 else 1
    n = max(1, len(values))
    w = width / n
    rects = []
    for i, v in enumerate(values):
        h = (height - 12) * (v / top)
        rects.append(f'<rect x="{i * w:.1f}" y="{height - h:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}"'
                     f' fill="{color}"><title>{v:g}</title></rect>')
    return Markup(f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}"'
                  f' viewBox="0 0 {width} {height}"><text x="2" y="10" font-size="10">max {top:g}</text>'
                  + "".join(rects) + "</svg>")


def hbar(value: float | None, scale: float, label: str, width: int = 200) -> Markup:
    """One horizontal bar (a latency percentile against the largest one shown)."""
    v = value or 0.0
    w = 0 if scale <= 0 else width * min(1.0, v / scale)
    return Markup(f'<svg class="hbar" width="{width}" height="12" role="img" aria-label="{escape(label)}">'
                  f'<rect x="0" y="1" width="{w:.1f}" height="10" fill="#6a9f3b"/></svg>')
