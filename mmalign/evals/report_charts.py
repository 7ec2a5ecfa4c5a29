"""Charts for `mmalign report`: training curves (one chart per metric and run family) and forest plots of every
gain or win rate with a confidence interval the runs' results files carry. Returns HTML strings, text escaped."""
from __future__ import annotations

import math
from html import escape
from pathlib import Path

from .report import Run
from .svg_chart import FEW_POINTS, PALETTE, forest_chart, line_chart

AUTO_SMOOTH = 0.6  # EMA weight when none is given ...
SMOOTH_FROM = 20  # ... for a chart whose longest curve has at least this many points
SKIPPED_KEYS = ("step", "elapsed_s")
WIN_RATE = "Win rate vs the baseline, % [95 % CI] (50 = no preference)"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def training_section(runs: list[Run], smooth: float | None) -> str:
    """A table of the logs, then per run family one chart per metric holding every log of that family."""
    logs = [log for run in runs for log in run.logs]
    if not logs:
        return ""
    colours = {log.name: PALETTE[i % len(PALETTE)] for i, log in enumerate(logs)}
    rows = []
    for log in logs:
        last = log.records[-1] if log.records else {}
        loss = f"{last['loss']:.4g}" if _number(last.get("loss")) else "–"
        rows.append(f"<tr><td class=l>{escape(log.name)}</td><td class=l>{escape(log.family)}</td>"
                    f"<td>{len(log.records)}</td><td>{escape(str(last.get('step', '–')))}</td><td>{escape(loss)}</td>"
                    f"<td>{escape(str(last.get('elapsed_s', '–')))}</td></tr>")
    out = ["<table><tr><th class=l>log</th><th class=l>family</th><th>records</th><th>last step</th>"
           "<th>final loss</th><th>elapsed s</th></tr>" + "".join(rows) + "</table>"]
    families = list(dict.fromkeys(log.family for log in logs))
    for family in families:
        members = [log for log in logs if log.family == family]
        keys = list(dict.fromkeys(k for log in members for r in log.records for k, v in r.items()
                                  if k not in SKIPPED_KEYS and _number(v)))
        charts, weights, few = [], set(), False
        for key in keys:
            series = {log.name: [(r["step"], float(r[key])) for r in log.records if _number(r.get(key))]
                      for log in members}
            series = {n: pts for n, pts in series.items() if pts}
            if not any(math.isfinite(y) for pts in series.values() for _, y in pts):
                continue
            longest = max(len(pts) for pts in series.values())
            w = smooth if smooth is not None else (AUTO_SMOOTH if longest >= SMOOTH_FROM else 0.0)
            weights.add(w if longest >= FEW_POINTS else 0.0)
            few |= min(len(pts) for pts in series.values()) < FEW_POINTS
            charts.append(line_chart(series, f"{key} · {family}", smooth=w, colours=colours))
        how = ", ".join(f"EMA {w:g} (raw faint behind)" if w else "unsmoothed" for w in sorted(weights))
        marked = f"; curves of fewer than {FEW_POINTS} points: every point marked and labelled" if few else ""
        out.append(f"<h3>{escape(family)} runs</h3><p class=note>{len(members)} log(s); curves {escape(how)}"
                   f"{marked}.</p>"
                   f'<div class="charts">{"".join(charts)}</div>')
    return "".join(out)


class Forest:
    """Forest-plot rows grouped by what they measure (one plot per group, one axis per plot)."""

    def __init__(self):
        self.groups: dict[str, dict] = {}

    def add(self, group: str, label: str, est, ci, scale: float = 1.0, ref: float = 0.0, fmt: str = "{:+.3g}"):
        if not (_number(est) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_number, ci))):
            return
        g = self.groups.setdefault(group, {"ref": ref, "fmt": fmt, "rows": []})
        g["rows"].append((label, scale * est, scale * ci[0], scale * ci[1]))

    def html(self) -> str:
        return "".join(forest_chart(g["rows"], title, ref=g["ref"], fmt=g["fmt"]) for title, g in self.groups.items())


def _short(path) -> str:
    """The last two parts of a folder path, enough to tell sample folders apart in a label."""
    return "/".join(Path(str(path)).parts[-2:])


def collect_forest(runs: list[Run], run_labels: list[str]) -> Forest:
    """Every comparison with a CI: the diffusion demo's accuracy gains and win rates, the vision-language demo's
    per-capability gains, and from results files `eval compare`'s mean difference and win rate
    (extra["<metric>_ci95"]), an evaluator's paired comparison (extra["comparison"]) and the video demo's gains."""
    forest = Forest()
    for run, name in zip(runs, run_labels):
        pre = f"{name} · " if len(runs) > 1 else ""
        for _, doc, _ in run.diffusion:
            for m, r in doc["aligned"].items():
                for attr, g in r["gain"].items():
                    forest.add("Diffusion demo: attribute accuracy gain vs base, points [95 % CI]",
                               f"{pre}{m} · {attr}", g["gain"], g["ci95"], 100.0, fmt="{:+.1f}")
                wr = r["win_rate"]
                forest.add(WIN_RATE, f"{pre}{m} vs base (diffusion demo)", wr["win_rate"], wr["ci95"], 100.0, 50.0,
                           "{:.1f}")
        for _, doc in run.mllm:
            c = doc["comparison"]
            for cap, r in [*c["table"].items(), ("overall", c["overall"])]:
                forest.add("Vision-language demo: score gain vs base, points [95 % CI]", f"{pre}{cap}", r["gain"],
                           r["ci95"], fmt="{:+.1f}")
        for _, loaded in run.evals:
            doc = loaded["doc"]
            extras = doc.get("mmalign", {}).get("extra", {})
            for task, metrics in loaded["tasks"].items():
                extra, cfg = extras.get(task, {}), doc.get("configs", {}).get(task, {})
                if "a" in cfg and "b" in cfg:
                    who = f"{pre}{_short(cfg['a'])} vs {_short(cfg['b'])}"
                    forest.add(f"{cfg.get('scorer', task)}: mean difference A − B [95 % CI]", who,
                               metrics.get("mean_diff"), extra.get("mean_diff_ci95"))
                    forest.add(WIN_RATE, f"{who} ({cfg.get('scorer', task)})", metrics.get("win_rate"),
                               extra.get("win_rate_ci95"), 100.0, 50.0, "{:.1f}")
                comp = extra.get("comparison")
                if isinstance(comp, dict):
                    forest.add(f"{task}: paired gain vs {comp.get('against', 'base')} [95 % CI]", f"{pre}{task}",
                               comp.get("gain"), comp.get("ci95"))
                if task.endswith("_gain") and isinstance(extra.get("ci95"), dict):
                    for m, v in metrics.items():
                        forest.add(f"{task} · {m} [95 % CI]", f"{pre}{m}", v, extra["ci95"].get(m))
    return forest
