"""Hand-written inline SVG charts (no JavaScript, no external resources): line charts for training curves and
forest plots for gains with confidence intervals."""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
FEW_POINTS = 6  # a series with fewer finite points gets a marker and a value label on every point


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


def _value_label(x: float, y: float, text: str, right_half: bool, near_top: bool) -> str:
    """A point's value beside it, on the sides facing the plot's centre (so it stays inside the plot)."""
    dx, anchor = (-7, "end") if right_half else (7, "start")
    return (f'<text class="val" x="{x + dx:.1f}" y="{y + (14 if near_top else -6):.1f}" text-anchor="{anchor}">'
            f"{escape(text)}</text>")


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
        finite_pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        layers = [(pts, 1.0)]
        if smooth > 0 and len(finite_pts) >= FEW_POINTS:
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
        if len(finite_pts) < FEW_POINTS:  # few points: each one marked and labelled, never a lone dot
            for x, y in finite_pts:
                parts.append(f'<circle class="pt" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}">'
                             f'<title>{escape(name)}: step {x:g}, {y:.4g}</title></circle>'
                             + _value_label(px(x), py(y), f"{y:.3g}", px(x) > left + plot_w / 2, py(y) < top + 16))
        lx, ly = 8 + (i % 3) * (width // 3), height + 14 + 18 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def forest_chart(rows: list[tuple[str, float, float, float]], title: str, ref: float = 0.0, fmt: str = "{:+.1f}",
                 width: int = 900) -> str:
    """A forest plot: one row per (label, estimate, ci_lo, ci_hi): a dot, its CI as a whisker, the numbers at
    the right, and a dashed line at `ref` (no effect). A CI that excludes `ref` is drawn dark, others grey."""
    if not rows:
        raise ValueError(f"forest plot {title!r}: no rows")
    vals = [v for _, est, lo, hi in rows for v in (est, lo, hi)] + [ref]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"forest plot {title!r}: non-finite estimate or CI")
    xt = nice_ticks(min(vals), max(vals))
    label_w, text_w, top, row_h = 300, 170, 26, 22
    plot_w = width - label_w - text_w
    height = top + row_h * len(rows) + 30

    def px(x):
        return label_w + (x - xt[0]) / (xt[-1] - xt[0]) * plot_w

    parts = [f'<svg class="chart forest" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="8" y="16" class="ctitle">{escape(title)}</text>']
    bottom = top + row_h * len(rows)
    for v in xt:
        parts.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{bottom}" stroke="#eee"/>'
                     f'<text x="{px(v):.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt_tick(v)}</text>')
    parts.append(f'<line class="ref" x1="{px(ref):.1f}" y1="{top - 4}" x2="{px(ref):.1f}" y2="{bottom}" '
                 f'stroke="#555" stroke-dasharray="4 3"/>')
    for i, (label, est, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        colour = "#1f4e9c" if lo > ref or hi < ref else "#888"
        numbers = f"{fmt.format(est)} [{fmt.format(lo)}, {fmt.format(hi)}]"
        shown = label if len(label) <= 48 else label[:47] + "…"  # the full label in the tooltip
        parts.append(f'<g class="row"><title>{escape(label)}: {escape(numbers)}</title><text x="{label_w - 8}" '
                     f'y="{y + 4:.1f}" text-anchor="end">{escape(shown)}</text>'
                     f'<line x1="{px(lo):.1f}" y1="{y:.1f}" x2="{px(hi):.1f}" y2="{y:.1f}" stroke="{colour}" '
                     f'stroke-width="2"/><circle cx="{px(est):.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>'
                     f'<text x="{label_w + plot_w + 10}" y="{y + 4:.1f}">{escape(numbers)}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)
