"""HTML for `mmalign report`: tables, embedded images (base64 data URIs) and SVG charts, all text escaped.
The page has no scripts and a Content-Security-Policy that forbids every resource but inline data."""
from __future__ import annotations

import json
import math
import time
from html import escape
from pathlib import Path

from .report import SMALL_IMAGE, Run, Sample, SampleSet, guarded, image_uri, pair_by_prompt_seed
from .svg_chart import PALETTE, line_chart

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{border-bottom:2px solid #ccc;margin-top:36px}h3{margin-top:24px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.sig{font-weight:bold}.note{color:#666;font-size:12px}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart text{font-size:11px;fill:#333}svg.chart text.ctitle{font-size:13px;font-weight:bold}
.blocks{display:flex;flex-wrap:wrap;gap:8px}.pair{border:1px solid #ddd;padding:4px}
figure{display:inline-block;margin:2px;vertical-align:top;font-size:11px;text-align:center;max-width:120px;
overflow-wrap:break-word}img.t{width:112px;height:auto}img.px{image-rendering:pixelated}.cap{font-size:12px}
div.skip{width:112px;height:112px;background:#fee;display:flex;align-items:center;justify-content:center}"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class Markup(str):
    """Text that is already HTML (everything else is escaped on output)."""


def esc(x) -> str:
    return x if isinstance(x, Markup) else escape(str(x))


def table(head: list, rows: list[list], left: int = 1) -> Markup:
    """A <table>; the first `left` columns left-aligned; cells escaped unless Markup."""
    def row(cells, tag):
        return "<tr>" + "".join(f'<{tag}{" class=l" if i < left else ""}>{esc(c)}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"
    return Markup("<table>" + row(head, "th") + "".join(row(r, "td") for r in rows) + "</table>")


def html_fmt(template: str, *values) -> Markup:
    """`template` (trusted HTML with {} slots) filled with escaped values."""
    return Markup(template.format(*(esc(v) for v in values)))


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def with_ci(v: float, ci, scale: float = 100.0, signed: bool = False) -> Markup:
    """'41.4 [35.6, 47.7]' (values x scale); bold when a signed gain's CI excludes 0."""
    f = "{:+.1f}" if signed else "{:.1f}"
    text = f"{f.format(scale * v)} [{f.format(scale * ci[0])}, {f.format(scale * ci[1])}]"
    sig = signed and (ci[0] > 0 or ci[1] < 0)
    return Markup(f"<b>{escape(text)}</b>" if sig else escape(text))


def img_tag(path: Path, alt: str) -> Markup:
    uri, side = image_uri(path)
    cls = "t px" if side <= SMALL_IMAGE else "t"
    return Markup(f'<img class="{cls}" src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">')


def _scores(scores: dict) -> tuple[str, str]:
    """(visible, tooltip): the 'correct' score alone when present (ShapeWorld's overall verdict), else all."""
    full = " · ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in scores.items())
    shown = f"correct {scores['correct']:g}" if isinstance(scores.get("correct"), (int, float)) else full
    return shown, full


def _figure(smp: Sample, alt: str, label: str) -> str:
    shown, full = _scores(smp.scores)
    pic = img_tag(smp.file, alt) if smp.skipped is None else f'<div class="skip">skipped: {escape(smp.skipped)}</div>'
    return (f'<figure title="{escape(full)}">{pic}<figcaption>{escape(label)}'
            f'{"<br>" + escape(shown) if shown else ""}</figcaption></figure>')


def skip_note(sets: list[SampleSet]) -> str:
    """A warning counting, per sample file, the images not shown and why (empty when none was skipped)."""
    counts = [(st.label, st.skips()) for st in sets]
    parts = [f"{label}: " + ", ".join(f"{n} {reason}" for reason, n in skips.items()) for label, skips in counts
             if skips]
    if not parts:
        return ""
    return (f'<p class="warn">Images skipped (never read): {escape("; ".join(parts))}. Only files inside the run '
            f"directory are embedded.</p>")


def compare_grid(sets: list[SampleSet], max_images: int) -> Markup:
    """One block per (prompt, seed) present in every set: the set's images side by side (before, then after)."""
    keys, warnings = pair_by_prompt_seed(sets)
    n_blocks = min(len(keys), max(1, max_images // len(sets)))
    lookup = [{(s.prompt, s.seed): s for s in st.samples} for st in sets]
    blocks = []
    for prompt, seed in keys[:n_blocks]:
        figs = "".join(_figure(d[(prompt, seed)], f"{st.label}: {prompt} (seed {seed})", st.label)
                       for st, d in zip(sets, lookup))
        blocks.append(f'<div class="pair"><div class="cap">{escape(prompt)} <span class=note>seed {seed}</span>'
                      f"</div>{figs}</div>")
    note = (f"<p class=note>Same prompts and seeds in every block ({' | '.join(escape(s.label) for s in sets)}). "
            f"Showing {n_blocks} of {len(keys)} paired (prompt, seed) blocks ({n_blocks * len(sets)} images; at most "
            f"{max_images} images per grid).</p>")
    warn = "".join(f'<p class="warn">{escape(w)}</p>' for w in warnings) + skip_note(sets)
    return Markup(warn + note + '<div class="blocks">' + "".join(blocks) + "</div>")


def sample_grid(st: SampleSet, max_images: int) -> Markup:
    shown = st.samples[:max_images]
    figs = [_figure(s, s.prompt, s.prompt + ("" if s.seed is None else f" (seed {s.seed})")) for s in shown]
    note = (f"<p class=note>Showing {len(shown)} of {len(st.samples)} samples from {escape(str(st.path))} "
            f"(at most {max_images} images per grid).</p>")
    return Markup(skip_note([st]) + note + '<div class="blocks">' + "".join(figs) + "</div>")


def training_html(run: Run, smooth: float, headline: dict) -> Markup:
    keys = []
    for log in run.logs:
        for r in log.records:
            keys += [k for k, v in r.items() if k not in ("step", "elapsed_s") and k not in keys
                     and isinstance(v, (int, float)) and not isinstance(v, bool)]
    charts, colours = [], {log.name: PALETTE[i % len(PALETTE)] for i, log in enumerate(run.logs)}
    for key in keys:
        series = {log.name: [(r["step"], float(r[key])) for r in log.records if isinstance(r.get(key), (int, float))]
                  for log in run.logs}
        series = {n: pts for n, pts in series.items() if pts}
        if any(math.isfinite(y) for pts in series.values() for _, y in pts):
            charts.append(line_chart(series, key, smooth=smooth, colours=colours))
    rows = []
    for log in run.logs:
        last = log.records[-1] if log.records else {}
        rows.append([log.name, len(log.records), last.get("step", "–"),
                     f"{last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else "–",
                     last.get("elapsed_s", "–")])
        if isinstance(last.get("loss"), (int, float)):
            headline[f"final training loss [{log.name}]"] = f"{last['loss']:.4g}"
    note = html_fmt("<p class=note>EMA smoothing {} (raw curves faint).</p>", smooth) if smooth else ""
    return Markup("<h3>Training curves</h3>" + table(["log", "records", "last step", "final loss", "elapsed s"], rows)
                  + note + '<div class="charts">' + "".join(charts) + "</div>")


def diffusion_html(path: Path, doc: dict, sets: list[SampleSet], max_images: int, headline: dict) -> Markup:
    """`doc`: the demo's results as unpack_diffusion_demo gives them."""
    base, aligned = doc["base"]["accuracy"], doc["aligned"]
    sp = doc["sampler"]
    out = [html_fmt("<h3>Diffusion demo: {}</h3><p>Base {}; {} held-out prompts (prompt seed {}, sample seeds "
                    "{}–{}); {}, {} steps, guidance {}.</p>", path, doc["model"], doc["n_prompts"], doc["prompt_seed"],
                    doc["sample_seeds"][0], doc["sample_seeds"][1], sp["scheduler"], sp["steps"], sp["guidance"])]
    if "pairs" in doc:
        p = doc["pairs"]
        out.append(html_fmt("<p>On-policy pairs: {} from {} prompts × {} samples.</p>", p["pairs"], p["prompts"],
                            p["per_prompt"]))
    models = {"base": base, **{m: r["accuracy"] for m, r in aligned.items()}}
    rows = []
    for attr in base:
        rows.append([attr, *(with_ci(acc[attr]["mean"], acc[attr]["ci95"]) if attr in acc else "–"
                             for acc in models.values()), base[attr]["n"]])
        for m, acc in models.items():
            if attr in acc:
                headline[f"diffusion {attr} accuracy % ({m})"] = pct(acc[attr]["mean"])
    out.append("<h4>Attribute accuracy, % [95 % CI]</h4>" + table(["attribute", *models, "n"], rows))
    if aligned:
        rows = [[attr, *(with_ci(r["gain"][attr]["gain"], r["gain"][attr]["ci95"], signed=True)
                         if attr in r["gain"] else "–" for r in aligned.values())] for attr in base]
        out.append("<h4>Paired gain vs base, points [95 % CI] (bold: CI excludes 0)</h4>"
                   + table(["attribute", *aligned], rows))
        rows = []
        for m, r in aligned.items():
            wr = r["win_rate"]
            rows.append([m, with_ci(wr["win_rate"], wr["ci95"]), f"{wr['wins']} / {wr['ties']} / {wr['losses']}",
                         wr["n"], r.get("guidance", "–"), r.get("train_seconds", "–")])
            headline[f"diffusion win rate vs base % ({m})"] = pct(wr["win_rate"])
        out.append("<h4>Win rate vs base on the same prompts and seeds, % [95 % CI]</h4>"
                   + table(["method", "win rate", "W / T / L", "n", "guidance", "train s"], rows))
    if sets:
        out.append("<h4>Before / after samples</h4>" + (compare_grid(sets, max_images) if len(sets) > 1
                                                          else sample_grid(sets[0], max_images)))
    else:
        out.append("<p class=note>No sample files found beside this results file.</p>")
    return Markup("".join(out))


def mllm_html(path: Path, doc: dict, headline: dict) -> Markup:
    """`doc`: the demo's results as unpack_mllm_demo gives them."""
    c, base, al = doc["comparison"], doc["base"], doc["aligned"]
    out = [html_fmt("<h3>Vision-language demo: {}</h3><p>Base {}; {} held-out questions; DPO on {} on-policy answer "
                    "pairs.</p>", path, doc["model"], doc["n_questions"], doc["pairs"]["n_pairs"])]
    rows = []
    for cap, r in [*c["table"].items(), ("overall", c["overall"])]:
        rows.append([cap, f"{r['before']:.1f}", f"{r['after']:.1f}", with_ci(r["gain"], r["ci95"], 1.0, True), r["n"]])
        headline[f"VQA {cap} score (base)"] = f"{r['before']:.1f}"
        headline[f"VQA {cap} score (aligned)"] = f"{r['after']:.1f}"
    rows.append(["macro (mean over capabilities)", f"{base['macro']:.1f}", f"{al['macro']:.1f}", "", ""])
    out.append("<h4>Per-capability score (mean grade × 100), paired gain [95 % CI]</h4>"
               + table(["capability", "base", "aligned", "gain", "n"], rows))
    keys = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    rows = [[k, pct(base["pope"][k]), pct(al["pope"][k])] for k in keys]
    rows += [[k, base["pope"][k], al["pope"][k]] for k in ("unparsed", "n")]
    out.append("<h4>POPE (existence questions), %</h4>" + table(["metric", "base", "aligned"], rows))
    return Markup("".join(out))


def _ci_for(extra: dict, metric: str, n_metrics: int):
    """A metric's CI from the results file's mmalign.extra[task]: extra["ci95"][metric], extra[metric]["ci95"],
    or extra["ci95"] as [lo, hi] when the task has a single metric."""
    ci = extra.get("ci95")
    for cand in (ci.get(metric) if isinstance(ci, dict) else None,
                 extra.get(metric, {}).get("ci95") if isinstance(extra.get(metric), dict) else None,
                 ci if isinstance(ci, list) and n_metrics == 1 else None):
        if isinstance(cand, list) and len(cand) == 2:
            return cand
    return None


def data_table(d: dict) -> Markup:
    """A mapping as a table: a dict of flat dicts becomes rows x their keys; anything else key / JSON value."""
    if d and all(isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()) for v in d.values()):
        cols = list(dict.fromkeys(k for v in d.values() for k in v))
        return table(["", *cols], [[k, *(v.get(c, "") for c in cols)] for k, v in d.items()])
    return table(["key", "value"], [[k, v if isinstance(v, str) else json.dumps(v, default=str)] for k, v in d.items()])


def eval_html(path: Path, loaded: dict, headline: dict) -> Markup:
    doc = loaded["doc"]
    mm = doc.get("mmalign", {})
    date = doc.get("date")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(date)) if isinstance(date, (int, float)) else "?"
    cfg = doc.get("config", {})
    out = [html_fmt("<h3>Evaluation results: {}</h3><p>Model {} {}; written {}.</p>", path, cfg.get("model", "?"),
                    json.dumps(cfg.get("model_args", {}), default=str), when)]
    for task, metrics in loaded["tasks"].items():
        extra = mm.get("extra", {}).get(task, {})
        hib = doc["higher_is_better"].get(task, {})
        rows = []
        for m, v in metrics.items():
            se = doc["results"][task].get(f"{m}_stderr,none", "N/A")
            ci = _ci_for(extra, m, len(metrics))
            rows.append([m, f"{v:.4g}" if isinstance(v, (int, float)) else v,
                         f"{se:.3g}" if isinstance(se, (int, float)) else se,
                         f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "–", {True: "↑", False: "↓"}.get(hib.get(m), "?")])
            if isinstance(v, (int, float)):
                headline[f"{task} {m}"] = f"{v:.4g}"
        ns = doc.get("n-samples", {}).get(task, {})
        out.append(html_fmt("<h4>{}</h4><p class=note>samples: {} (effective {}); version {}</p>", task,
                            ns.get("original", "?"), ns.get("effective", "?"), doc.get("versions", {}).get(task, "?"))
                   + table(["metric", "value", "stderr", "95 % CI", "better"], rows))
        rest = {k: v for k, v in extra.items() if k != "ci95" and k not in metrics}
        flat = {k: v for k, v in rest.items() if not isinstance(v, dict)}
        if flat:
            out.append("<p class=note>Further results (mmalign.extra):</p>" + data_table(flat))
        for k, v in rest.items():
            if isinstance(v, dict):  # e.g. a per-capability table
                out.append(html_fmt("<p class=note>{} (mmalign.extra):</p>", k) + data_table(v))
        if doc.get("configs", {}).get(task):
            out.append("<p class=note>Task settings:</p>" + data_table(doc["configs"][task]))
    if mm.get("provenance"):
        out.append("<h4>Provenance</h4>" + data_table(mm["provenance"]))
    return Markup("".join(out))


def render_run(run: Run, smooth: float, max_images: int) -> tuple[Markup, dict]:
    """One run's section and its headline metrics {label: formatted value} for the side-by-side table."""
    headline, parts = {}, []
    if run.logs:
        with guarded(run.logs[0].path):
            parts.append(training_html(run, smooth, headline))
    for path, doc, sets in run.diffusion:
        with guarded(path):
            parts.append(diffusion_html(path, doc, sets, max_images, headline))
    for path, doc in run.mllm:
        with guarded(path):
            parts.append(mllm_html(path, doc, headline))
    for path, loaded in run.evals:
        with guarded(path):
            parts.append(eval_html(path, loaded, headline))
    for st in run.sample_sets:
        parts.append(Markup(f"<h3>Samples: {escape(str(st.path))}</h3>") + sample_grid(st, max_images))
    return Markup("".join(parts)), headline


def render_page(runs: list[Run], smooth: float = 0.0, max_images: int = 64) -> str:
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    sections, headlines = [], []
    for i, run in enumerate(runs):
        body, headline = render_run(run, smooth, max_images)
        sections.append(f'<section id="run{i}"><h2>{escape(str(run.root))}</h2>{body}</section>')
        headlines.append(headline)
    side = ""
    if len(runs) > 1:
        labels = [k for k in dict.fromkeys(k for h in headlines for k in h) if sum(k in h for h in headlines) > 1]
        if labels:
            side = ("<h2>Side by side</h2><p class=note>Metrics found in more than one run.</p>"
                    + table(["metric", *(f"{i + 1}. {r.root.name}" for i, r in enumerate(runs))],
                            [[k, *(h.get(k, "–") for h in headlines)] for k in labels]))
    toc = "".join(f'<li><a href="#run{i}">{escape(str(r.root))}</a></li>' for i, r in enumerate(runs))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<link rel="icon" href="data:,"><title>mmalign report</title>'
            f"<style>{CSS}</style></head><body><h1>mmalign report</h1>"
            f"<p class=note>Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"Self-contained: charts are inline SVG, images are embedded.</p><ul>{toc}</ul>"
            f"{side}{''.join(sections)}</body></html>\n")
