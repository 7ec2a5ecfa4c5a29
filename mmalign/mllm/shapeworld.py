"""ShapeWorld VQA for vision-language models: a deterministic benchmark, its evaluation (per-capability
accuracy table and POPE metrics), paired before/after comparison with bootstrap CIs, and on-policy
preference pairs graded by the exact ShapeWorld grader.

Every question is a single user turn with the image first: [{"type": "image"}, {"type": "text", ...}].
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from ..datasets.shapeworld import Scene, render_scene, sample_scenes
from ..datasets.shapeworld.vqa import CAPABILITIES, VQAItem, grade, make_vqa, pope_metrics
from ..core.stats import bootstrap_ci, ci_unit, paired_gain_ci
from .generate import generate_answers
from .rejection import message_text

PAIRINGS = ("best", "all")
BALANCES = ("none", "mirror")


class VQAExample(NamedTuple):
    scene: Scene
    image: Image.Image
    item: VQAItem


def question_messages(question: str) -> list[dict]:
    """The TRL-form prompt: one user turn, the image then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_messages(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def vqa_benchmark(seed: int = 0, n_scenes: int = 64, per_scene: int = 6, split: str | None = "heldout",
                  image_size: int = 32) -> list[VQAExample]:
    """(scene, rendered image, VQA item) for `n_scenes` scenes, at most `per_scene` questions each; a pure
    function of its arguments."""
    rng = random.Random(seed)
    out = []
    for scene in sample_scenes(seed, n_scenes, split=split):
        image = render_scene(scene, image_size)
        out += [VQAExample(scene, image, item) for item in make_vqa(scene, rng, per_scene)]
    return out


def example_key(ex: VQAExample) -> str:
    """Identity of an example (scene geometry + question + answer), for checking paired comparisons."""
    text = json.dumps([ex.scene.to_dict(), ex.item.question, ex.item.answer, ex.item.capability], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def summarize_vqa(bench: list[VQAExample], predictions: list[str]) -> dict:
    """Scores of given predictions: per-item grades, the per-capability table (mean grade x 100 and n),
    overall (micro over items, macro over capabilities present) and POPE metrics on the existence items;
    `groups`: each item's scene caption, the unit the CIs resample (questions about scenes of one caption are
    not independent draws)."""
    if len(bench) != len(predictions):
        raise ValueError(f"{len(bench)} examples but {len(predictions)} predictions")
    items = [ex.item for ex in bench]
    scores = [grade(it, p) for it, p in zip(items, predictions)]
    table = {}
    for cap in CAPABILITIES:
        s = [x for x, it in zip(scores, items) if it.capability == cap]
        if s:
            table[cap] = {"score": 100 * sum(s) / len(s), "n": len(s)}
    return {
        "keys": [example_key(ex) for ex in bench],
        "capabilities": [it.capability for it in items],
        "groups": [ex.scene.caption for ex in bench],
        "predictions": list(predictions),
        "scores": scores,
        "table": table,
        "overall": 100 * sum(scores) / len(scores) if scores else 0.0,
        "macro": sum(r["score"] for r in table.values()) / len(table) if table else 0.0,
        "pope": pope_metrics(items, list(predictions)),
    }


def evaluate_vqa(model, processor, bench: list[VQAExample], batch_size: int = 64,
                 max_new_tokens: int = 24) -> dict:
    """Greedy answers to every benchmark question, graded (see `summarize_vqa` for the result's keys)."""
    prompts = [([ex.image], question_messages(ex.item.question)) for ex in bench]
    preds = generate_answers(model, processor, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return summarize_vqa(bench, preds)


def format_table(result: dict) -> str:
    """MM-Vet-style markdown table: one row per capability, then overall and POPE."""
    lines = ["| capability | score | n |", "|---|---:|---:|"]
    lines += [f"| {cap} | {r['score']:.1f} | {r['n']} |" for cap, r in result["table"].items()]
    lines.append(f"| overall | {result['overall']:.1f} | {len(result['scores'])} |")
    p = result["pope"]
    lines.append(f"| POPE acc / F1 / yes-ratio | {100 * p['accuracy']:.1f} / {100 * p['f1']:.1f} / "
                 f"{100 * p['yes_ratio']:.0f} % | {p['n']} |")
    return "\n".join(lines)


def compare_vqa(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired per-capability gains (after - before, points x 100) with 95 % bootstrap CIs over the items'
    scene captions (all questions about scenes of one caption resampled together; over items for results
    without `groups`), for two results on the same examples (ValueError otherwise), plus POPE accuracy / F1
    before and after."""
    if before["keys"] != after["keys"]:
        n_diff = sum(a != b for a, b in zip(before["keys"], after["keys"])) + abs(
            len(before["keys"]) - len(after["keys"]))
        raise ValueError(f"compare_vqa needs results on the same examples in the same order "
                         f"({len(before['keys'])} vs {len(after['keys'])} items, {n_diff} differ)")
    caps, groups = before["capabilities"], before.get("groups")

    def gain(mask):
        b = [100 * s for s, m in zip(before["scores"], mask) if m]
        a = [100 * s for s, m in zip(after["scores"], mask) if m]
        g, lo, hi = paired_gain_ci(a, b, n_boot=n_boot, seed=seed,
                                   groups=None if groups is None else [x for x, m in zip(groups, mask) if m])
        return {"before": sum(b) / len(b), "after": sum(a) / len(a), "gain": g, "ci95": [lo, hi],
                "n": len(b), "significant": lo > 0 or hi < 0}

    out = {"table": {cap: gain([c == cap for c in caps]) for cap in CAPABILITIES if cap in caps},
           "overall": gain([True] * len(caps)),
           "ci_unit": ci_unit(groups, "scene captions")}
    out["pope"] = {k: {"accuracy": r["pope"]["accuracy"], "f1": r["pope"]["f1"],
                       "yes_ratio": r["pope"]["yes_ratio"]} for k, r in (("before", before), ("after", after))}
    return out


def format_comparison(cmp: dict) -> str:
    lines = ["| capability | before | after | gain [95 % CI] | n |", "|---|---:|---:|---|---:|"]
    for cap, r in list(cmp["table"].items()) + [("overall", cmp["overall"])]:
        lo, hi = r["ci95"]
        lines.append(f"| {cap} | {r['before']:.1f} | {r['after']:.1f} | {r['gain']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
                     f" | {r['n']} |")
    return "\n".join(lines)


def preference_pairs(answers: list[str], grades: list[float], pairing: str = "best") -> list[tuple[int, int]]:
    """(better, worse) sample indices among distinct non-empty answers whose grades differ. "best": one pair,
    the first best-graded vs the first worst-graded; "all": every two distinct answers with different grades."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    first = {}
    for i, a in enumerate(answers):
        if a.strip() and a not in first:
            first[a] = i
    idx = list(first.values())
    if not idx:
        return []
    if pairing == "best":
        hi = max(idx, key=lambda i: grades[i])
        lo = min(idx, key=lambda i: grades[i])
        return [(hi, lo)] if grades[hi] > grades[lo] else []
    return [(i, j) if grades[i] > grades[j] else (j, i)
            for i, j in itertools.combinations(idx, 2) if grades[i] != grades[j]]


def mirror_balance(pairs: list[tuple[str, str]]) -> list[int]:
    """Indices of (chosen, rejected) answer pairs to keep so that no answer is preferred for its own sake: for
    every two answers a, b, as many "a over b" as "b over a" are kept (the first ones in order); a two-answer
    combination seen only once is kept. Without this, on-policy pairs teach the answer prior of the pair
    questions (a base that over-answers "2" on the training scenes sees "2" mostly rejected) instead of reading
    the image."""
    seen: dict[tuple[str, str], int] = {}
    for a, b in pairs:
        seen[(a, b)] = seen.get((a, b), 0) + 1
    quota = {k: n if n + seen.get(k[::-1], 0) == 1 else min(n, seen.get(k[::-1], 0)) for k, n in seen.items()}
    kept = []
    for i, k in enumerate(pairs):
        if quota[k] > 0:
            quota[k] -= 1
            kept.append(i)
    return kept


def onpolicy_vqa_pairs(model, processor, bench: list[VQAExample], out_dir: str | Path, n_samples: int = 4,
                       temperature: float = 1.0, seed: int = 0, pairing: str = "best", batch_size: int = 64,
                       max_new_tokens: int = 24, balance: str = "none") -> dict:
    """Sample `n_samples` answers per question, grade them and write TRL pairs (chosen graded above
    rejected) to `out_dir` with `write_vl_pairs_jsonl`; meta holds the capability, the true answer, both
    grades and margin = their difference. Empty answers are never paired. `balance="mirror"`: per capability,
    `mirror_balance` drops pairs that would make one answer preferred regardless of the image (counted in the
    summary's `balance_dropped`). Returns a summary: n_pairs, prompts whose samples all grade equally (no
    preference, also by capability), mean sample grade."""
    from ..datasets.vl_records import write_vl_pairs_jsonl

    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 to compare answers, got {n_samples}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    prompts = [([ex.image], question_messages(ex.item.question)) for ex in bench for _ in range(n_samples)]
    samples = generate_answers(model, processor, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=temperature, seed=seed, batch_size=batch_size)
    rows, no_pref, no_pref_by_cap, grades_all = [], 0, {}, []
    n_empty = 0
    for k, ex in enumerate(bench):
        answers = samples[k * n_samples:(k + 1) * n_samples]
        grades = [grade(ex.item, a) for a in answers]
        grades_all += grades
        n_empty += sum(not a.strip() for a in answers)
        pairs = preference_pairs(answers, grades, pairing)
        if not pairs:
            no_pref += 1
            cap = ex.item.capability
            no_pref_by_cap[cap] = no_pref_by_cap.get(cap, 0) + 1
        for i, j in pairs:
            rows.append(([ex.image], question_messages(ex.item.question), answer_messages(answers[i]),
                         answer_messages(answers[j]),
                         {"capability": ex.item.capability, "truth": ex.item.answer, "chosen_grade": grades[i],
                          "rejected_grade": grades[j], "margin": grades[i] - grades[j], "example": k}))
    dropped: dict[str, int] = {}
    if balance == "mirror":
        rows, dropped = balance_rows(rows)
    path = write_vl_pairs_jsonl(out_dir, rows)
    summary = {"n_prompts": len(bench), "n_samples": len(samples), "n_pairs": len(rows), "pairing": pairing,
               "balance": balance, "balance_dropped": dropped,
               "no_preference": no_pref, "no_preference_by_capability": no_pref_by_cap,
               "mean_sample_grade": sum(grades_all) / len(grades_all) if grades_all else 0.0,
               "empty_samples": n_empty, "temperature": temperature, "seed": seed, "path": str(path)}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def balance_rows(rows: list[tuple]) -> tuple[list[tuple], dict[str, int]]:
    """`mirror_balance` within each capability over pair rows (images, prompt, chosen, rejected, meta); returns
    the kept rows in their order and the number dropped per capability."""
    by_cap: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_cap.setdefault(r[4]["capability"], []).append(i)
    keep, dropped = set(), {}
    for cap, idx in by_cap.items():
        text = [(message_text(rows[i][2][0]), message_text(rows[i][3][0])) for i in idx]
        kept = [idx[k] for k in mirror_balance(text)]
        keep.update(kept)
        if len(kept) < len(idx):
            dropped[cap] = len(idx) - len(kept)
    return [r for i, r in enumerate(rows) if i in keep], dropped


def accuracy_ci(result: dict, capability: str | None = None, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """(mean, low, high) bootstrap CI of the mean grade x 100, over all items or one capability's."""
    keep = [i for i, c in enumerate(result["capabilities"]) if capability in (None, c)]
    groups = result.get("groups")
    return list(bootstrap_ci([100 * result["scores"][i] for i in keep], n_boot=n_boot, seed=seed,
                             groups=None if groups is None else [groups[i] for i in keep]))
