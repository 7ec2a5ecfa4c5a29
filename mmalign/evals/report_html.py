"""HTML for `mmalign report`: the page (headline results first: results tables and forest plots; then sample
grids; then training curves), tables, embedded images (base64 data URIs) and SVG charts, all text escaped.
The page has no scripts and a Content-Security-Policy that forbids every resource but inline data."""
from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path

from .report import Run, folder_labels, guarded
from .report_charts import collect_forest, training_section
from .report_grids import compare_grid, sample_folder_grids, sample_grid

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{border-bottom:2px solid #ccc;margin-top:36px}h3{margin-top:24px}h4{margin:18px 0 6px}
h5{font-size:13px;margin:12px 0 4px}svg.chart text.val{font-size:10px}svg.forest{display:block;margin:6px 0 14px}
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


def diffusion_html(path: Path, doc: dict, headline: dict) -> Markup:
    """`doc`: the demo's results as unpack_diffusion_demo gives them."""
    base, aligned = doc["base"]["accuracy"], doc["aligned"]
    sp = doc["sampler"]
    out = [html_fmt("<h4>Diffusion demo: {}</h4><p>Base {}; {} held-out prompts (prompt seed {}, sample seeds "
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
    out.append("<h5>Attribute accuracy, % [95 % CI]</h5>" + table(["attribute", *models, "n"], rows))
    if aligned:
        rows = [[attr, *(with_ci(r["gain"][attr]["gain"], r["gain"][attr]["ci95"], signed=True)
                         if attr in r["gain"] else "–" for r in aligned.values())] for attr in base]
        out.append("<h5>Paired gain vs base, points [95 % CI] (bold: CI excludes 0)</h5>"
                   + table(["attribute", *aligned], rows))
        rows = []
        for m, r in aligned.items():
            wr = r["win_rate"]
            rows.append([m, with_ci(wr["win_rate"], wr["ci95"]), f"{wr['wins']} / {wr['ties']} / {wr['losses']}",
                         wr["n"], r.get("guidance", "–"), r.get("train_seconds", "–")])
            headline[f"diffusion win rate vs base % ({m})"] = pct(wr["win_rate"])
        out.append("<h5>Win rate vs base on the same prompts and seeds, % [95 % CI]</h5>"
                   + table(["method", "win rate", "W / T / L", "n", "guidance", "train s"], rows))
    return Markup("".join(out))


def mllm_html(path: Path, doc: dict, headline: dict) -> Markup:
    """`doc`: the demo's results as unpack_mllm_demo gives them."""
    c, base, al = doc["comparison"], doc["base"], doc["aligned"]
    out = [html_fmt("<h4>Vision-language demo: {}</h4><p>Base {}; {} held-out questions; DPO on {} on-policy answer "
                    "pairs.</p>", path, doc["model"], doc["n_questions"], doc["pairs"]["n_pairs"])]
    rows = []
    for cap, r in [*c["table"].items(), ("overall", c["overall"])]:
        rows.append([cap, f"{r['before']:.1f}", f"{r['after']:.1f}", with_ci(r["gain"], r["ci95"], 1.0, True), r["n"]])
        headline[f"VQA {cap} score (base)"] = f"{r['before']:.1f}"
        headline[f"VQA {cap} score (aligned)"] = f"{r['after']:.1f}"
    rows.append(["macro (mean over capabilities)", f"{base['macro']:.1f}", f"{al['macro']:.1f}", "", ""])
    unit = f" ({c['ci_unit']})" if "ci_unit" in c else ""
    out.append(html_fmt("<h5>Per-capability score (mean grade × 100), paired gain [95 % CI]{}</h5>", unit)
               + table(["capability", "base", "aligned", "gain", "n"], rows))
    keys = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    rows = [[k, pct(base["pope"][k]), pct(al["pope"][k])] for k in keys]
    rows += [[k, base["pope"][k], al["pope"][k]] for k in ("unparsed", "n")]
    out.append("<h5>POPE (existence questions), %</h5>" + table(["metric", "base", "aligned"], rows))
    return Markup("".join(out))


def _ci_for(extra: dict, metric: str, n_metrics: int):
    """A metric's CI from the results file's mmalign.extra[task]: extra["ci95"][metric], extra["<metric>_ci95"]
    (`eval compare`: win_rate_ci95, mean_diff_ci95), extra[metric]["ci95"], or extra["ci95"] as [lo, hi] when
    the task has a single metric."""
    ci = extra.get("ci95")
    for cand in (ci.get(metric) if isinstance(ci, dict) else None, extra.get(f"{metric}_ci95"),
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
    out = [html_fmt("<h4>Evaluation results: {}</h4><p>Model {} {}; written {}.</p>", path, cfg.get("model", "?"),
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
        out.append(html_fmt("<h5>{}</h5><p class=note>samples: {} (effective {}); version {}</p>", task,
                            ns.get("original", "?"), ns.get("effective", "?"), doc.get("versions", {}).get(task, "?"))
                   + table(["metric", "value", "stderr", "95 % CI", "better"], rows))
        rest = {k: v for k, v in extra.items()
                if k != "ci95" and k not in metrics and k.removesuffix("_ci95") not in metrics}
        flat = {k: v for k, v in rest.items() if not isinstance(v, dict)}
        if flat:
            out.append("<p class=note>Further results (mmalign.extra):</p>" + data_table(flat))
        for k, v in rest.items():
            if isinstance(v, dict):  # e.g. a per-capability table
                out.append(html_fmt("<p class=note>{} (mmalign.extra):</p>", k) + data_table(v))
        if doc.get("configs", {}).get(task):
            out.append("<p class=note>Task settings:</p>" + data_table(doc["configs"][task]))
    if mm.get("provenance"):
        out.append("<h5>Provenance</h5>" + data_table(mm["provenance"]))
    return Markup("".join(out))


def results_html(run: Run, headline: dict) -> Markup:
    """One run's results tables; fills `headline` {label: formatted value} for the side-by-side table."""
    parts = []
    for path, doc, _ in run.diffusion:
        with guarded(path):
            parts.append(diffusion_html(path, doc, headline))
    for path, doc in run.mllm:
        with guarded(path):
            parts.append(mllm_html(path, doc, headline))
    for path, loaded in run.evals:
        with guarded(path):
            parts.append(eval_html(path, loaded, headline))
    return Markup("".join(parts))


def samples_html(runs: list[Run], max_images: int) -> str:
    """The demos' before/after grids, then the plain sample folders of all runs, paired where they can be."""
    parts = []
    for run in runs:
        for path, _, sets in run.diffusion:
            head = f"<h3>Before / after: {escape(str(path))}</h3>"
            if not sets:
                parts.append(head + "<p class=note>No sample files found beside this results file.</p>")
                continue
            with guarded(path):
                parts.append(head + (compare_grid(sets, max_images) if len(sets) > 1
                                     else sample_grid(sets[0], max_images)))
    parts.append(sample_folder_grids([st for run in runs for st in run.sample_sets], max_images))
    return "".join(parts)


def side_by_side(runs: list[Run], headlines: list[dict], labels: list[str]) -> str:
    """Metrics found in more than one run, one column per run."""
    keys = [k for k in dict.fromkeys(k for h in headlines for k in h) if sum(k in h for h in headlines) > 1]
    if len(runs) < 2 or not keys:
        return ""
    return ("<h3>Side by side</h3><p class=note>Metrics found in more than one run.</p>"
            + table(["metric", *(f"{i + 1}. {name}" for i, name in enumerate(labels))],
                    [[k, *(h.get(k, "–") for h in headlines)] for k in keys]))


def render_page(runs: list[Run], smooth: float | None = None, max_images: int = 64) -> str:
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    labels = folder_labels([r.root for r in runs])
    headlines, results = [], []
    for i, (run, name) in enumerate(zip(runs, labels)):
        headline = {}
        body = results_html(run, headline)
        if body:
            results.append(f'<section id="run{i}"><h3>{escape(name)} <span class=note>{escape(str(run.root))}'
                           f"</span></h3>{body}</section>")
        headlines.append(headline)
    forest = collect_forest(runs, labels).html()
    samples = samples_html(runs, max_images)
    training = training_section(runs, smooth)
    sections = [("headline", "Headline results", (f"<h3>Gains and win rates with 95 % CIs</h3>{forest}" if forest
                                                  else "") + side_by_side(runs, headlines, labels) + "".join(results)),
                ("samples", "Samples", samples), ("training", "Training curves", training)]
    sections = [(sid, title, body) for sid, title, body in sections if body]
    toc = "".join(f'<li><a href="#{sid}">{title}</a></li>' for sid, title, _ in sections)
    body = "".join(f'<h2 id="{sid}">{title}</h2>{html}' for sid, title, html in sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<link rel="icon" href="data:,"><title>mmalign report</title>'
            f"<style>{CSS}</style></head><body><h1>mmalign report</h1>"
            f"<p class=note>{escape(', '.join(str(r.root) for r in runs))}. Written "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Self-contained: charts are inline SVG, images "
            f"are embedded.</p><ul>{toc}</ul>{body}</body></html>\n")
