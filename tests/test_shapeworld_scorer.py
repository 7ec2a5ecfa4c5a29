"""ShapeWorld determinism, caption grammar, and the exact image scorer's accuracy (clean and degraded)."""
import random

import numpy as np
import pytest

from mmalign.datasets.shapeworld import (Scene, degrade, extract_objects, heldout_part, is_heldout, parse_caption,
                                         render_scene, render_shapes, sample_scene, sample_scenes, score_image)


def attribute_accuracy(scenes, images):
    """Fraction of (object, attribute) pairs recovered, matching each true object to the nearest detection,
    plus the per-image count accuracy."""
    hits = {"colour": 0, "shape": 0, "size": 0}
    n_obj, count_ok = 0, 0
    for scene, im in zip(scenes, images):
        found = extract_objects(im)
        count_ok += len(found) == len(scene.shapes)
        for s in scene.shapes:
            n_obj += 1
            if found:
                o = min(found, key=lambda o: (o.x - s.x) ** 2 + (o.y - s.y) ** 2)
                hits["colour"] += o.colour == s.colour
                hits["shape"] += o.shape == s.shape
                hits["size"] += o.size == s.size
    acc = {k: v / n_obj for k, v in hits.items()}
    acc["count"] = count_ok / len(scenes)
    return acc


def test_scenes_are_deterministic_by_seed():
    a, b = sample_scenes(3, 40), sample_scenes(3, 40)
    assert a == b
    assert sample_scenes(4, 40) != a
    assert np.array_equal(np.asarray(render_scene(a[0])), np.asarray(render_scene(b[0])))


def test_caption_grammar_round_trips():
    rng = random.Random(0)
    for kind in ("single", "pair", "relation", "count"):
        for _ in range(20):
            scene = sample_scene(rng, kind)
            req = parse_caption(scene.caption)
            assert [(c, s) for c, s, _ in req.objects] == [(x.colour, x.shape) for x in scene.shapes]
            assert req.relation == scene.relation
            assert Scene.from_dict(scene.to_dict()) == scene
    for bad in ("a pink circle", "two red", "a red circle beside a blue square", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_heldout_split_is_disjoint():
    train = {s.caption for s in sample_scenes(0, 400, split="train")}
    held = {s.caption for s in sample_scenes(1, 100, split="heldout")}
    assert train and held and not train & held
    assert all(is_heldout(c) for c in held)


def test_heldout_captions_split_into_validation_and_test():
    """Calibration (validation) and reported numbers (test) never share a caption; together they are heldout."""
    held = {s.caption for s in sample_scenes(1, 600, split="heldout")}
    val = {s.caption for s in sample_scenes(2, 300, split="validation")}
    test = {s.caption for s in sample_scenes(3, 300, split="test")}
    assert val and test and not val & test
    assert all(is_heldout(c) for c in val | test)
    assert {heldout_part(c) for c in held} == {"validation", "test"}
    assert len(val) > 60 and len(test) > 60  # each half keeps many compositions (95 and 96 in all)
    with pytest.raises(ValueError, match="split must be one of"):
        sample_scenes(0, 1, split="val")


def clean(scene, resolution, rng):
    return render_scene(scene, resolution)


def degraded(scene, resolution, rng):
    """Tinted washed-out background, colour shift, contrast change, blur and noise, as a small model's samples."""
    return degrade(render_scene(scene, resolution), rng)


@pytest.mark.parametrize("make,resolution,floor", [(clean, 32, 0.98), (clean, 64, 0.98), (degraded, 32, 0.95),
                                                   (degraded, 64, 0.95)])
def test_scorer_accuracy(make, resolution, floor):
    scenes = sample_scenes(11 + resolution, 300)
    rng = np.random.default_rng(0)
    images = [make(s, resolution, rng) for s in scenes]
    acc = attribute_accuracy(scenes, images)
    assert min(acc.values()) >= floor, acc
    correct = np.mean([score_image(im, s.caption)["correct"] for im, s in zip(images, scenes)])
    assert correct >= floor


def test_scorer_reads_colours_on_the_measured_washed_out_background():
    """An undertrained UNet painted the background ~RGB(150,180,170); an absolute-threshold scorer read 20 %."""
    scenes = sample_scenes(13, 200)
    images = [render_shapes(s.shapes, 32, background=(150, 180, 170)) for s in scenes]
    assert attribute_accuracy(scenes, images)["colour"] >= 0.97


def test_scorer_rejects_wrong_captions():
    scene = Scene(sample_scene(random.Random(5), "single").shapes, "", "single")
    s = scene.shapes[0]
    other_colour = "blue" if s.colour != "blue" else "red"
    other_shape = "circle" if s.shape != "circle" else "square"
    img = render_scene(scene)
    assert score_image(img, f"a {s.colour} {s.shape}")["correct"] == 1.0
    assert score_image(img, f"a {other_colour} {s.shape}")["colour"] == 0.0
    assert score_image(img, f"a {s.colour} {other_shape}")["shape"] == 0.0
    assert score_image(img, f"two {s.colour} {s.shape}s")["count"] == 0.0


def test_blank_and_noise_images_have_no_objects_that_pass():
    blank = np.full((32, 32, 3), 245, np.uint8)
    assert extract_objects(blank) == []
    assert score_image(blank, "a red circle")["correct"] == 0.0
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    assert score_image(noise, "a red circle")["correct"] == 0.0
