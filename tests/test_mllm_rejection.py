"""Rejection sampling (best-of-N): the kept answer is the best-scored sample, ties go to the first, the
threshold drops and counts prompts, runs are reproducible; the CLI writes conversations mllm_sft can read."""
import json

import pytest

from mmalign.cli import SCORER_NAMES, main
from mmalign.datasets.shapeworld.export import write_dataset
from mmalign.datasets.vl_records import read_vl_conversations
from mmalign.mllm.models import load_vlm
from mmalign.mllm.rejection import SCORERS, best_of_n, exact_match, prompts_from_conversations, shapeworld_vqa


def test_scorers_by_hand():
    assert exact_match("Two.", "two", {}) == 1.0 and exact_match("two", "two circles", {}) == 0.0
    assert shapeworld_vqa("2", "there are two circles", {"capability": "count"}) == 1.0
    assert shapeworld_vqa("red", "red or orange", {"capability": "colour"}) == 0.0
    with pytest.raises(ValueError, match="capability"):
        shapeworld_vqa("red", "red", {})
    assert set(SCORERS) == set(SCORER_NAMES)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw") / "data"
    write_dataset(out, 4, seed=3, vqa_per_scene=2)
    return out


def test_best_of_n_keeps_the_best_sample(tiny_llava_dir, vqa_dir):
    model, proc = load_vlm(tiny_llava_dir)
    records, report = read_vl_conversations(vqa_dir)
    assert report.kept == 8
    prompts = prompts_from_conversations(records)
    assert prompts[0][3]["question"] and prompts[0][3]["capability"]
    by_length = lambda ref, answer, meta: float(len(answer.split()) % 3)  # noqa: E731  a deterministic stand-in
    rows, summary = best_of_n(model, proc, prompts, n=3, scorer=by_length, seed=5, max_new_tokens=6)
    assert summary.prompts == summary.kept == len(rows) == 8
    for images, messages, meta in rows:
        scores = meta["sample_scores"]
        assert len(scores) == 3 and meta["best_score"] == max(scores)
        assert by_length("", messages[-1]["content"][0]["text"], {}) == max(scores)
        assert messages[-1]["role"] == "assistant" and len(images) == 1
    again, _ = best_of_n(model, proc, prompts, n=3, scorer=by_length, seed=5, max_new_tokens=6)
    assert [r[1] for r in again] == [r[1] for r in rows]
    kept, s2 = best_of_n(model, proc, prompts, n=3, scorer=by_length, seed=5, max_new_tokens=6, min_score=2.0)
    assert s2.kept + s2.below_min_score == 8 and len(kept) == s2.kept
    assert s2.below_min_score == sum(1 for r in rows if r[2]["best_score"] < 2.0)


def test_cli_best_of_n(tiny_llava_dir, vqa_dir, tmp_path, capsys):
    out = tmp_path / "bon"
    main(["data", "best-of-n", "--model", tiny_llava_dir, "--prompts", str(vqa_dir), "--out", str(out),
          "--n", "2", "--scorer", "shapeworld_vqa", "--max-new-tokens", "4"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["prompts"] == 8 and info["kept"] == 8
    records, report = read_vl_conversations(out)
    assert report.kept == 8 and all(r.meta["capability"] for r in records)
