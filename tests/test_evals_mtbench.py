"""MT-Bench-style grading: rating parse, multi-turn judge prompts (turn 2 sees turn 1, references), reading
questions, failures left out and counted, multi-turn answering on a tiny LLaVA, and the paired comparison."""
import json

import pytest

from mmalign.datasets.records import DataError
from mmalign.evals.mllm_tasks import paired_comparison
from mmalign.evals.mtbench import (MTQuestion, answer_questions, grade_answers, judge_messages, parse_rating,
                                   read_questions, summarize)
from mmalign.core.stats import paired_gain_ci

Q = MTQuestion("81", "math", ("What is 2+3?", "And times 4?"), ("5", "20"))


class Scripted:
    id = "scripted"

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def complete(self, messages, temperature=0.0, seed=None):
        self.prompts.append(messages[-1]["content"])
        return self.replies.pop(0)


def test_parse_rating():
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0 and parse_rating("[[8.5]]") == 8.5
    assert parse_rating("rated [6] overall") == 6.0 and parse_rating("[[1]] then [[9]]") == 1.0
    for bad in ("7/10", "Rating: 7", "[[11]]", "[[0]]", "", None):
        assert parse_rating(bad) is None


def test_turn_two_prompt_sees_turn_one_and_the_reference():
    first, second = (judge_messages(Q, ["five", "twenty"], k)[1]["content"] for k in (0, 1))
    assert "What is 2+3?" in first and "five" in first and "And times 4?" not in first and "twenty" not in first
    assert "### Reference answer (turn 1):\n5" in first and "penalise mistakes" in first
    assert second.index("What is 2+3?") < second.index("five") < second.index("And times 4?") < \
        second.index("### Reference answer (turn 2):\n20") < second.index("twenty")
    assert "LAST question (turn 2) only" in second and "Reference answer (turn 1)" not in second
    plain = judge_messages(MTQuestion("1", "writing", ("Write a haiku.",)), ["..."], 0)[1]["content"]
    assert "Reference" not in plain and "[[6]]" in plain


def test_read_questions(tmp_path):
    rows = [{"question_id": 1, "category": "writing", "turns": ["a", "b"]},
            {"question_id": 2, "turns": ["a", "b"], "reference": ["only one"]},
            {"question_id": 3, "turns": []}, {"turns": ["a"]}, [1]]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    qs, report = read_questions(path, bad_rows="skip")
    assert qs == [MTQuestion("1", "writing", ("a", "b"), None)] and sum(report.skipped.values()) == 4
    assert report.skipped["row is not a JSON object"] == 1
    with pytest.raises(DataError, match="q.jsonl:2: 'reference'"):
        read_questions(path)


def test_grading_and_summary_by_hand():
    qs = [Q, MTQuestion("82", "writing", ("Write.", "Shorter."))]
    judge = Scripted(["[[9]]", "meh", "[[4]]"] + ["no rating"] * 5 + ["Rating: [[6]]"])
    records = grade_answers(qs, [["5", "20"], ["text", "txt"]], judge, seed=0)
    assert [(r["id"], r["score"], r["tries"]) for r in records] == [
        ("81#1", 9.0, 1), ("81#2", 4.0, 2), ("82#1", None, 5), ("82#2", 6.0, 1)]
    s = summarize(records)
    assert s["score"] == pytest.approx(19 / 3) and s["turns"] == {1: 9.0, 2: 5.0}
    assert s["categories"] == {"math": 6.5, "writing": 6.0} and s["parse_failures"] == 1 and s["n"] == 4
    with pytest.raises(ValueError, match="2 turns but 1 answers"):
        grade_answers([Q], [["5"]], judge)


def test_paired_comparison_uses_items_scored_in_both():
    base = {"a": 5.0, "b": 6.0, "c": None, "d": 2.0}
    new = {"a": 7.0, "b": 6.0, "c": 9.0, "e": 1.0}
    cmp = paired_comparison(base, new, n_boot=500, seed=0)
    assert cmp["n_paired"] == 2 and cmp["unpaired"] == 3 and cmp["gain"] == pytest.approx(1.0)
    assert cmp["ci95"] == pytest.approx(list(paired_gain_ci([7.0, 6.0], [5.0, 6.0], n_boot=500, seed=0)[1:]))
    with pytest.raises(ValueError, match="no item scored in both"):
        paired_comparison({"x": 1.0}, {"y": 1.0}, 100, 0)


def test_paired_comparison_resamples_groups():
    """Ten questions on each of 12 images, all gains on one image: significant over items, not over images."""
    ids = [f"q{i}" for i in range(120)]
    base = {i: 0.0 for i in ids}
    new = {i: 1.0 if k < 10 else 0.0 for k, i in enumerate(ids)}
    groups = {i: f"img{k // 10}.png" for k, i in enumerate(ids)}
    assert paired_comparison(base, new, 1000, 0)["significant"]
    cmp = paired_comparison(base, new, 1000, 0, groups=groups)
    assert not cmp["significant"] and cmp["ci95"][0] == 0.0 and "12 distinct images" in cmp["ci_unit"]
    del groups["q119"]  # an item without a group is its own
    assert "13 distinct images" in paired_comparison(base, new, 1000, 0, groups=groups)["ci_unit"]


@pytest.mark.usefixtures("one_thread")
def test_multi_turn_answers_carry_the_first_turn(tiny_llava_dir, monkeypatch):
    import mmalign.mllm.generate as gen
    from mmalign.mllm.models import load_vlm

    seen = []
    real = gen.generate_answers

    def spy(model, processor, items, **kw):
        seen.append(items)
        return real(model, processor, items, **kw)

    monkeypatch.setattr(gen, "generate_answers", spy)
    model, processor = load_vlm(tiny_llava_dir)
    qs = [Q, MTQuestion("2", "x", ("Describe the image.",))]
    answers = answer_questions(model, processor, qs, max_new_tokens=4)
    assert [len(a) for a in answers] == [2, 1] and len(seen) == 2 and len(seen[1]) == 1
    images, msgs = seen[1][0]
    assert images == [] and [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"][0]["text"] == answers[0][0] and msgs[2]["content"][0]["text"] == "And times 4?"
