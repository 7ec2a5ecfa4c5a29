import random

import pytest

from mmalign.datasets.shapeworld.scene import Scene, Shape, sample_scenes
from mmalign.datasets.shapeworld.vqa import CAPABILITIES, VQAItem, grade, make_vqa, pope_metrics


def _items(seed: int, n_scenes: int, per_scene=None) -> list[VQAItem]:
    rng = random.Random(seed)
    return [it for sc in sample_scenes(seed, n_scenes) for it in make_vqa(sc, rng, per_scene)]


def _relation_scene() -> Scene:
    # red circle at left-top, blue square at right-bottom: "left of" holds on x, "above" on y
    return Scene((Shape("red", "circle", "large", 0.25, 0.3), Shape("blue", "square", "small", 0.75, 0.7)),
                 "a red circle left of a blue square", "relation", "left of")


def test_deterministic_by_seed():
    assert _items(3, 40) == _items(3, 40)
    assert _items(3, 40, per_scene=3) == _items(3, 40, per_scene=3)
    assert _items(3, 40) != _items(4, 40)


def test_ground_truth_grades_one_and_capabilities_covered():
    items = _items(0, 150)
    assert {it.capability for it in items} == set(CAPABILITIES)
    for it in items:
        assert grade(it, it.answer) == 1.0, it


def test_per_scene_caps_and_mixes():
    rng = random.Random(1)
    for sc in sample_scenes(1, 30):
        items = make_vqa(sc, rng, per_scene=3)
        assert len(items) == 3
        assert len({it.capability for it in items}) == 3


def test_question_preconditions_hold():
    for sc in sample_scenes(2, 200):
        shape_counts = [s.shape for s in sc.shapes]
        colour_counts = [s.colour for s in sc.shapes]
        for it in make_vqa(sc, random.Random(0)):
            if it.capability == "colour":
                assert shape_counts.count(it.question.split()[-1].rstrip("?")) == 1
            if it.capability == "shape":
                assert colour_counts.count(it.question.split()[-2]) == 1


def test_existence_and_spatial_balance():
    items = _items(5, 200)
    for cap, lo, hi in (("existence", 0.4, 0.6), ("spatial", 0.35, 0.65)):
        answers = [it.answer for it in items if it.capability == cap]
        assert len(answers) > 50
        assert lo <= answers.count("yes") / len(answers) <= hi, cap


def test_existence_negatives_are_mostly_hard():
    rng = random.Random(0)
    hard = total = 0
    for sc in sample_scenes(6, 100):
        colours, shapes = {s.colour for s in sc.shapes}, {s.shape for s in sc.shapes}
        for it in make_vqa(sc, rng):
            if it.capability == "existence" and it.answer == "no":
                c, s = it.question.rstrip("?").split()[-2:]
                assert (c, s) not in {(x.colour, x.shape) for x in sc.shapes}
                total += 1
                hard += c in colours or s in shapes
    assert hard / total > 0.7


def test_spatial_uses_true_geometry():
    items = [it for it in make_vqa(_relation_scene(), random.Random(0)) if it.capability == "spatial"]
    assert len(items) == 2  # one per axis
    truth = {"Is the red circle left of the blue square?": "yes", "Is the red circle right of the blue square?": "no",
             "Is the blue square left of the red circle?": "no", "Is the blue square right of the red circle?": "yes",
             "Is the red circle above the blue square?": "yes", "Is the red circle below the blue square?": "no",
             "Is the blue square above the red circle?": "no", "Is the blue square below the red circle?": "yes"}
    for it in items:
        assert truth[it.question] == it.answer
    close = Scene((Shape("red", "circle", "small", 0.3, 0.2), Shape("blue", "square", "small", 0.4, 0.8)),
                  "a red circle and a blue square", "pair")
    qs = [it.question for it in make_vqa(close, random.Random(0)) if it.capability == "spatial"]
    assert len(qs) == 1 and ("above" in qs[0] or "below" in qs[0])  # x gap 0.1 < margin: not asked


@pytest.mark.parametrize("answer, prediction, score", [
    ("red", "Red.", 1.0), ("red", "The circle is red", 1.0), ("red", "red or orange", 0.0),
    ("red", "red and blue", 0.0), ("red", "blue", 0.0), ("red", "", 0.0), ("red", "reddish", 0.0),
])
def test_grade_colour(answer, prediction, score):
    assert grade(VQAItem("What colour is the circle?", answer, "colour"), prediction) == score


@pytest.mark.parametrize("prediction, score", [
    ("circle", 1.0), ("The red one is a circle", 1.0), ("Circles!", 1.0), ("a circle, not a square", 0.0),
    ("square", 0.0), ("an oval circle", 0.0), ("red", 0.0), ("???", 0.0),
])
def test_grade_shape(prediction, score):
    assert grade(VQAItem("What shape is the red object?", "circle", "shape"), prediction) == score


@pytest.mark.parametrize("answer, prediction, score", [
    ("2", "2", 1.0), ("2", "two", 1.0), ("2", "There are two shapes.", 1.0), ("2", "2 (two)", 1.0),
    ("2", "3", 0.0), ("2", "two or three", 0.0), ("2", "2 circles and 1 square", 0.0), ("2", "some", 0.0),
    ("1", "There is a circle", 0.0), ("1", "one", 1.0),
    ("0", "0", 1.0), ("0", "zero", 1.0), ("0", "none", 1.0), ("0", "There are no triangles.", 1.0),
    ("0", "No, there are 2", 0.0), ("3", "three", 1.0),
])
def test_grade_count(answer, prediction, score):
    assert grade(VQAItem("How many shapes are there?", answer, "count"), prediction) == score


@pytest.mark.parametrize("answer, prediction, score", [
    ("yes", "Yes", 1.0), ("yes", "yes, it is.", 1.0), ("yes", "No.", 0.0), ("yes", "I think so", 0.0),
    ("no", "no", 1.0), ("no", "There is no red circle", 1.0), ("no", "Yes, no doubt", 0.0),
    ("no", "nothing", 0.0), ("yes", "eyes", 0.0),
])
def test_grade_yes_no(answer, prediction, score):
    for cap in ("existence", "spatial"):
        assert grade(VQAItem("Is there a red circle?", answer, cap), prediction) == score


@pytest.mark.parametrize("truth, prediction, score", [
    ("a red circle left of a blue square", "a red circle left of a blue square", 1.0),
    ("a red circle left of a blue square", "A blue square to the right of a red circle.", 1.0),  # inverse
    ("a red circle left of a blue square", "a red circle right of a blue square", 0.5),  # wrong relation
    ("a red circle left of a blue square", "a red circle and a blue square", 0.5),  # missing relation
    ("a red circle left of a blue square", "a red circle", 2 / 3 * 0.5),  # P=1, R=1/2, no relation
    ("a red circle left of a blue square", "a green triangle above a yellow circle", 0.0),
    ("two red circles", "Two red circles.", 1.0),
    ("two red circles", "There are 2 small red circles", 1.0),
    ("two red circles", "a red circle", 2 / 3),  # P=1, R=1/2
    ("three red circles", "two red circles and a blue square", 2 * (2 / 3 * 2 / 3) / (4 / 3)),  # P=R=2/3
    ("a large green square", "a small green square", 1.0),  # sizes are not graded
    ("a large green square", "a green square and a green circle", 2 / 3),  # P=1/2, R=1
    ("a red circle and a blue square", "a blue square and a red circle", 1.0),
    ("a red circle and a blue square", "a blue square below a red circle", 1.0),  # no relation in the truth
    ("a red circle", "", 0.0), ("a red circle", "a circle", 0.0), ("a red circle", "!!! 12 ??", 0.0),
])
def test_grade_description(truth, prediction, score):
    item = VQAItem("Describe the image.", truth, "description")
    assert grade(item, prediction) == pytest.approx(score)


def test_grade_never_raises_on_junk():
    items = _items(7, 30)
    for junk in ("", "   ", "\n", "😀", "a" * 500, "2" * 50, "left of above below", None, 3):
        for it in items:
            assert 0.0 <= grade(it, junk) <= 1.0


def test_pope_metrics_hand_computed():
    yes, no = (VQAItem("Is there a red circle?", a, "existence") for a in ("yes", "no"))
    other = VQAItem("What colour is the circle?", "red", "colour")
    items = [yes, yes, yes, no, no, no, other]
    preds = ["yes", "no", "maybe", "yes", "no", "hmm", "yes"]
    # existence only (6): TP=1 (yes/yes), FN=2 (yes/no, yes/maybe), FP=1 (no/yes), TN=1 (no/no), no/hmm wrong
    # accuracy = (1+1)/6, precision = 1/(1+1), recall = 1/(1+2), f1 = 2*(1/2)(1/3)/(1/2+1/3) = 0.4
    # yes_ratio = 2 predicted yes / 6; unparsed = 2 ("maybe", "hmm")
    m = pope_metrics(items, preds)
    assert m["n"] == 6 and m["unparsed"] == 2
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        pope_metrics(items, preds[:-1])


def test_pope_metrics_perfect_and_all_yes():
    items = [it for it in _items(8, 50) if it.capability == "existence"]
    perfect = pope_metrics(items, [it.answer for it in items])
    assert perfect["accuracy"] == perfect["f1"] == 1.0
    assert perfect["yes_ratio"] == pytest.approx(0.5)
    always_yes = pope_metrics(items, ["Yes."] * len(items))
    assert always_yes["yes_ratio"] == 1.0 and always_yes["recall"] == 1.0
    assert always_yes["accuracy"] == pytest.approx(0.5)
