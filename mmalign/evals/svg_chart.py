"""Hand-written inline SVG line charts (no JavaScript, no external resources) for training curves."""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Ticks at multiples of a 'nice' step (1, 2, 2.5 or 5 x 10^k) enclosing [lo, hi], about `n` of them.

    step = the smallest nice value >= (hi - lo) / (n - 1); ticks = k * step for floor(lo/step) <= k <=
    ceil(hi/step), so the outer ticks enclose the data. A flat range (lo == hi) is widened to lo +/- |lo|/10
    (+/- 1 when lo is 0) first."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"need a finite range lo <= hi, got [{lo}, {hi}]")
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing):
    s_t = w s_{t-1} + (1 - w) x_t with s_0 = 0, reported as s_t / (1 - w^t) where t counts finite values.
    Non-finite values are passed through unchanged and do not update the average. weight 0 = identity."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must lie in [0, 1), got {weight}")
    out, s, t = [], 0.0, 0
    for x in values:
        if not math.isfinite(x):
            out.append(x)
            continue
        t += 1
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight ** t))
    return out


def _fmt_tick(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}"


def _segments(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Split a series at non-finite y values, so a NaN loss breaks the line instead of faking a value."""
    segs, cur = [], []
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y):
            cur.append((x, y))
        elif cur:
            segs.append(cur)
            cur = []
    return segs + ([cur] if cur else [])


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str = "step",
               width: int = 520, height: int = 240, smooth: float = 0.0, colours: dict[str, str] | None = None) -> str:
    """An <svg> with one polyline per named series (x, y), axes with nice ticks, and a legend below.

    Data -> pixels: px = left + (x - x0) / (x1 - x0) * plot_w,  py = top + (y1 - y) / (y1 - y0) * plot_h, where
    [x0, x1] and [y0, y1] are the outer ticks. With smooth > 0 the raw line is drawn faint under its EMA.
    `colours` fixes a series' colour (the same run in every chart); others take the palette in order."""
    finite = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        raise ValueError(f"chart {title!r}: no finite points to draw")
    xt = nice_ticks(min(x for x, _ in finite), max(x for x, _ in finite))
    yt = nice_ticks(min(y for _, y in finite), max(y for _, y in finite))
    left, right, top, bottom = 62, 12, 26, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    legend_rows = math.ceil(len(series) / 3)
    total_h = height + 18 * legend_rows

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * plot_w

    def py(y):
        return top + (yt[-1] - y) / (yt[-1] - yt[0]) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
             f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{escape(title)}">',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" class="ctitle">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for v in xt:
        parts.append(f'<line x1="{px(v):.1f}" y1="{top + plot_h}" x2="{px(v):.1f}" y2="{top + plot_h + 4}" '
                     f'stroke="#999"/><text x="{px(v):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{_fmt_tick(v)}</text>')
    for v in yt:
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + plot_w}" y2="{py(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{py(v) + 4:.1f}" text-anchor="end">{_fmt_tick(v)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = (colours or {}).get(name, PALETTE[i % len(PALETTE)])
        layers = [(pts, 1.0)]
        if smooth > 0:
            smoothed = list(zip([x for x, _ in pts], ema([y for _, y in pts], smooth)))
            layers = [(pts, 0.25), (smoothed, 1.0)]
        for layer, opacity in layers:
            for seg in _segments(layer):
                if len(seg) == 1:  # an isolated point (NaN on both sides) would be an invisible line
                    parts.append(f'<circle cx="{px(seg[0][0]):.1f}" cy="{py(seg[0][1]):.1f}" r="2" '
                                 f'fill="{colour}" fill-opacity="{opacity}"/>')
                    continue
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in seg)
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                             f'stroke-opacity="{opacity}" points="{coords}"/>')
        lx, ly = 8 + (i % 3) * (width // 3), height + 14 + 18 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
