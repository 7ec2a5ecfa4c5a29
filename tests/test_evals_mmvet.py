"""MM-Vet-style harness: ground truths, benchmark reading, the judge prompt and score parsing, per-capability and
per-combination scores (hand-computed), judge runs with mean/std and counted parse failures; LLaVA-Bench
relative scores; POPE on benchmark items."""
import json
import statistics

import pytest

from mmalign.datasets.records import DataError
from mmalign.datasets.shapeworld.vqa import VQAItem, grade
from mmalign.evals.judges import RuleJudge
from mmalign.evals.llava_bench import parse_pair, rate_items, rating_messages, relative_scores
from mmalign.evals.mmvet import (FEW_SHOT, BenchItem, capability_scores, grade_predictions, grading_messages,
                                 item_means, parse_grade, read_bench, summarize_runs, truth_parts)
from mmalign.evals.pope import pope_table
from test_evals_judges import Scripted  # a chat judge replying from a list, recording (temperature, seed)


def item(i, caps, answer="x", type_=None, category=None, question="q?"):
    return BenchItem(str(i), question, answer, tuple(caps), None, category, type_)


def test_truth_parts():
    assert truth_parts("cat <AND> dog") == ("and", ["cat", "dog"])
    assert truth_parts("3 <OR> three") == ("or", ["3", "three"])
    assert truth_parts(" red ") == ("single", ["red"])
    with pytest.raises(ValueError, match="mixes"):
        truth_parts("a <AND> b <OR> c")
    with pytest.raises(ValueError, match="empty part"):
        truth_parts("a <AND> ")


def test_read_bench_checks_rows(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    rows = [{"id": "a", "question": "q?", "image": "img.png", "answer": "x <OR> y",
             "capabilities": ["rec", "rec", "ocr"], "context": "a kitchen"},
            {"id": "b", "question": "q?", "answer": "x", "capabilities": []},
            {"id": "c", "question": "q?", "image": "missing.png", "answer": "x", "capabilities": ["rec"]},
            {"id": "a", "question": "q?", "answer": "x", "capabilities": ["rec"]},
            {"id": "d", "question": "q?", "answer": "x <AND> y <OR> z", "capabilities": ["rec"]}]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\nnot json\n")
    items, report = read_bench(path, bad_rows="skip")
    assert [it.id for it in items] == ["a"] and items[0].capabilities == ("rec", "ocr")
    assert items[0].image == str(tmp_path / "img.png") and items[0].context == "a kitchen"
    assert report.total == 6 and report.kept == 1 and sum(report.skipped.values()) == 5
    assert any("duplicate id" in r for r in report.skipped) and any("image not found" in r for r in report.skipped)
    with pytest.raises(DataError, match=r"bench.jsonl:2: 'capabilities'"):
        read_bench(path)


def test_grading_prompt_and_parse():
    msgs = grading_messages("What | is it?", "cat <AND> dog", "a cat\nand a dog")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert all(f"| {q} | {t} | {p} | {g} |" in user for q, t, p, g in FEW_SHOT)
    assert "| What / is it? | cat <AND> dog | a cat and a dog |\nReply" in user
    assert "<AND>" in user.split("Examples")[0] and "<OR>" in user.split("Examples")[0]
    assert parse_grade("0.7") == 0.7 and parse_grade(" 1.0 |") == 1.0 and parse_grade("Correctness: .5") == 0.5
    assert parse_grade("1") == 1.0 and parse_grade("0") == 0.0
    for bad in ("", "good", "7", "1.5", "-0.2", None):
        assert parse_grade(bad) is None


def test_capability_and_combination_scores_by_hand():
    grades = [1.0, 0.5, 0.0, 1.0]
    caps = [("rec",), ("rec", "spat"), ("ocr",), ("spat", "rec")]
    s = capability_scores(grades, caps)
    assert s["total"] == pytest.approx(62.5)
    assert s["capabilities"] == pytest.approx({"ocr": 0.0, "rec": 250 / 3, "spat": 75.0})
    assert s["combinations"] == pytest.approx({"ocr": 0.0, "rec": 100.0, "rec_spat": 75.0})
    assert s["n"] == {"capabilities": {"ocr": 1, "rec": 3, "spat": 2},
                      "combinations": {"ocr": 1, "rec": 1, "rec_spat": 2}}


def test_judge_runs_retries_failures_mean_and_std():
    items = [item(0, ["rec"]), item(1, ["rec", "math"])]
    # run 0: item 0 -> 0.5 at once; item 1 never parses (5 tries). run 1: item 0 -> 1.0 on try 2; item 1 -> 0.5
    judge = Scripted(["0.5"] + ["nope"] * 5 + ["??", "1.0", "0.5"])
    g = grade_predictions(items, ["p0", "p1"], judge, runs=2, temperature=0.0, seed=1)
    assert g["grades"] == [[0.5, 0.0], [1.0, 0.5]] and g["parse_failed"] == [[False, True], [False, False]]
    assert g["tries"] == [[1, 5], [2, 1]] and not judge.replies
    assert [t for t, _ in judge.seen[1:6]] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert len({s for _, s in judge.seen}) == len(judge.seen)  # every call has its own seed
    s = summarize_runs(g, items)
    assert s["total"]["mean"] == pytest.approx((25 + 75) / 2)
    assert s["total"]["std"] == pytest.approx(statistics.stdev([25, 75]))
    assert s["capabilities"]["math"]["mean"] == pytest.approx(25) and s["capabilities"]["rec"]["mean"] == 50
    assert s["combinations"]["math_rec"]["std"] == pytest.approx(statistics.stdev([0, 50]))
    assert s["parse_failures"] == 1 and s["parse_failures_per_run"] == [1, 0]
    assert item_means(g) == [0.75, 0.25]
    one = summarize_runs({"grades": [[1.0]], "parse_failed": [[False]]}, items[:1])
    assert one["total"] == {"mean": 100.0, "std": None}


def test_rule_judge_bypasses_the_prompt():
    qs = [VQAItem("How many circles are there?", "2", "count"), VQAItem("Is there a red square?", "no", "existence")]
    items = [item(i, ["rec"], q.answer, q.capability, question=q.question) for i, q in enumerate(qs)]
    preds = ["2", "yes"]
    g = grade_predictions(items, preds, RuleJudge(), runs=3)
    assert g["runs"] == 1 and g["grades"] == [[grade(q, p) for q, p in zip(qs, preds)]] == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="ShapeWorld questions only"):
        grade_predictions([item(0, ["ocr"], "x", None)], ["x"], RuleJudge())


def test_llava_bench_relative_scores():
    assert parse_pair("8 6\nbecause") == (8.0, 6.0) and parse_pair("7.5, 9") == (7.5, 9.0)
    assert parse_pair("8/6") == (8.0, 6.0)
    for bad in ("8", "eight six", "11 3", "0 5", "Scores: 8 6"):
        assert parse_pair(bad) is None
    pairs = [(8, 6), (10, 10), None, (4, 6)]
    cats = ["conv", "conv", "detail", "detail"]
    t = relative_scores(pairs, cats)
    assert t["conv"] == pytest.approx({"reference": 9, "candidate": 8, "relative": 800 / 9, "n": 2})
    assert t["detail"]["relative"] == pytest.approx(150.0) and t["detail"]["n"] == 1
    assert t["all"]["relative"] == pytest.approx(100 * (22 / 3) / (22 / 3)) and t["all"]["n"] == 3
    assert t["parse_failures"] == 1
    msgs = rating_messages("q?", "REF", "CAND", "a kitchen")
    assert msgs[1]["content"].index("REF") < msgs[1]["content"].index("CAND") and "a kitchen" in msgs[1]["content"]
    out = rate_items([item(0, ["rec"], "REF")], ["CAND"], Scripted(["bad", "9 3"]))
    assert out[0].score == (9.0, 3.0) and out[0].tries == 2


def test_pope_counts_predictions_and_unparsed_by_split():
    answers = ["yes", "yes", "no", "no", "yes", "no"]
    cats = ["random", "random", "random", "adversarial", "adversarial", "adversarial"]
    items = [item(i, ["rec"], a, "pope", c) for i, (a, c) in enumerate(zip(answers, cats))] + [item(9, ["ocr"], "x")]
    preds = ["Yes.", "hmm", "yes", "yes", "yes", "no", "anything"]
    t = pope_table(items, preds)
    # tp=2 (items 0, 4), fn=1 (item 1, unparsed), fp=2 (items 2, 3), tn=1 (item 5)
    assert t["all"] == pytest.approx({"accuracy": 3 / 6, "precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7,
                                      "yes_ratio": 4 / 6, "n": 6, "unparsed": 1})
    # the yes-ratio is of PREDICTIONS: 2 of 3 say yes on the adversarial split, whose truth has 1 yes in 3
    assert t["adversarial"]["yes_ratio"] == pytest.approx(2 / 3)
    assert t["adversarial"]["accuracy"] == pytest.approx(2 / 3)
    assert t["random"]["n"] == 3 and t["random"]["unparsed"] == 1
    assert pope_table([item(0, ["ocr"])], ["x"]) is None
    with pytest.raises(ValueError, match="yes/no answer"):
        pope_table([item(0, ["rec"], "maybe", "pope")], ["yes"])
