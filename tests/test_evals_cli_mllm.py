"""`mmalign data shapeworld-bench` and `mmalign eval mllm` end to end on the shipped ShapeWorld LLaVA: the rule
judge, the HTTP judge against a chat-completions server started by the test, judge runs, base vs aligned and
--compare with paired CIs, MT-Bench and LLaVA-Bench protocols."""
import json
from pathlib import Path

import pytest
from test_evals_judges import ChatServer

from mmalign.cli import main
from mmalign.datasets.shapeworld.vqa import VQAItem, grade
from mmalign.evals.shapeworld_bench import SHAPEWORLD_TAGS
from mmalign.evals.judges import JudgeRequestError, RuleJudge
from mmalign.evals.mmvet import read_bench
from mmalign.evals.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")
LLAVA = str(Path(__file__).resolve().parents[1] / "mmalign/assets/shapeworld_llava")
KEY_ENV, KEY = "MMALIGN_TEST_JUDGE_KEY", "sk-secret-value-42"


@pytest.fixture(scope="module")
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("swbench") / "b"
    main(["data", "shapeworld-bench", "--out", str(out), "--n", "3", "--per-scene", "3", "--seed", "1"])
    return out / "bench.jsonl"


def samples(results_path, task="mmvet"):
    p = Path(results_path)
    return [json.loads(line) for line in p.with_name(f"{p.stem}_samples_{task}.jsonl").read_text().splitlines()]


def eval_mllm(*args):
    main(["eval", "mllm", "--model", LLAVA, "--max-new-tokens", "16", *args])


def test_shapeworld_bench_is_consistent(bench):
    rows = [json.loads(line) for line in bench.read_text().splitlines()]
    assert len(rows) == 9 and len({r["id"] for r in rows}) == 9
    assert all((bench.parent / r["image"]).is_file() for r in rows)
    assert all(r["capabilities"] == SHAPEWORLD_TAGS[r["type"]] and r["category"] == r["type"] for r in rows)
    items, report = read_bench(bench)
    assert report.kept == 9
    assert all(RuleJudge().grade(it.question, it.answer, it.answer, it.type) == 1.0 for it in items)
    with pytest.raises(SystemExit, match="not empty"):
        main(["data", "shapeworld-bench", "--out", str(bench.parent), "--n", "1"])


def test_rule_judge_on_the_shipped_llava(bench, tmp_path):
    out = tmp_path / "r.json"
    eval_mllm("--bench", str(bench), "--judge", "rule", "--out", str(out))
    res = read_results(out)
    rows = samples(out)
    assert len(rows) == 9
    for r in rows:  # every grade is the exact ShapeWorld grade of the model's own answer
        assert r["score"] == grade(VQAItem(r["question"], r["answer"], r["type"]), r["prediction"])
    mmvet = res["tasks"]["mmvet"]
    assert mmvet["total"] == pytest.approx(100 * sum(r["score"] for r in rows) / 9) == pytest.approx(mmvet["rec"])
    assert mmvet["parse_failures"] == 0
    prov = res["doc"]["mmalign"]["provenance"]
    assert prov["judge"] == "rule:shapeworld_vqa" and prov["model"] == LLAVA and prov["parse_failures"] == 0
    existence = [r for r in rows if r["type"] == "existence"]
    assert ("pope" in res["tasks"]) == bool(existence)


def test_http_judge_end_to_end_with_runs_and_no_key_in_results(bench, tmp_path, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "h.json"
    before = server.calls["grader"]
    eval_mllm("--bench", str(bench), "--judge", "http", "--base-url", server.url("grader"), "--judge-model", "jm",
              "--api-key-env", KEY_ENV, "--judge-runs", "2", "--out", str(out))
    assert server.calls["grader"] - before == 18  # 9 items x 2 runs, every reply parsed at once
    rows = samples(out)
    for r in rows:  # the server's rule: 1.0 when the prediction contains the ground truth
        want = 1.0 if r["answer"].lower() in r["prediction"].lower() else 0.0
        assert r["grades"] == [want, want] and r["parse_failed"] == [False, False]
    doc = read_results(out)["doc"]
    extra = doc["mmalign"]["extra"]["mmvet"]
    assert extra["total"]["std"] == 0.0 and len(extra["runs"]) == 2  # a deterministic judge
    assert doc["mmalign"]["provenance"]["api_key_env"] == KEY_ENV
    assert doc["mmalign"]["provenance"]["judge"] == f"http:jm@{server.url('grader')}"
    for f in tmp_path.iterdir():
        assert KEY not in f.read_text()


def test_base_vs_aligned_and_compare(bench, tmp_path, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "pair.json"
    main(["eval", "mllm", "--model", LLAVA, "--model", LLAVA, "--bench", str(bench), "--judge", "rule",
          "--out", str(out), "--max-new-tokens", "16"])
    cmp = read_results(out)["doc"]["mmalign"]["extra"]["mmvet"]["comparison"]
    assert (tmp_path / "pair_base.json").is_file() and cmp["against"] == str(tmp_path / "pair_base.json")
    assert cmp["n_paired"] == 9 and cmp["gain"] == 0.0 and cmp["ci95"] == [0.0, 0.0]  # same model, greedy
    http = tmp_path / "http.json"
    eval_mllm("--bench", str(bench), "--judge", "http", "--base-url", server.url("grader"), "--judge-model", "jm",
              "--api-key-env", KEY_ENV, "--compare", str(out), "--out", str(http))
    cmp = read_results(http)["doc"]["mmalign"]["extra"]["mmvet"]["comparison"]
    new, base = samples(http), samples(out)
    assert cmp["n_paired"] == 9 and cmp["gain"] == pytest.approx(
        (sum(r["score"] for r in new) - sum(r["score"] for r in base)) / 9)
    assert cmp["ci95"][0] <= cmp["gain"] <= cmp["ci95"][1]


def test_mt_bench_and_llava_bench_protocols(bench, tmp_path, server):
    qs = tmp_path / "mt.jsonl"
    qs.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "count", "turns": ["How many shapes are there?", "And how many circles?"]},
        {"question_id": 2, "category": "colour", "turns": ["What colour is the circle?"], "reference": ["red"]}]))
    out = tmp_path / "mt.json"
    eval_mllm("--protocol", "mt-bench", "--bench", str(qs), "--judge", "http", "--base-url", server.url("grader"),
              "--judge-model", "jm", "--api-key-env", "", "--out", str(out))
    mt = read_results(out)["tasks"]["mt_bench"]
    assert mt == pytest.approx({"score": 20 / 3, "turn_1": 6.0, "turn_2": 8.0, "parse_failures": 0})
    out = tmp_path / "lb.json"
    eval_mllm("--protocol", "llava-bench", "--bench", str(bench), "--judge", "http", "--base-url",
              server.url("grader"), "--judge-model", "jm", "--api-key-env", "", "--limit", "4", "--out", str(out))
    lb = read_results(out)["tasks"]["llava_bench"]
    assert lb["relative_all"] == pytest.approx(75.0) and lb["parse_failures"] == 0
    assert {k for k in lb if k.startswith("relative_")} > {"relative_all"}  # one per category too


def test_clear_errors(bench, tmp_path, server, monkeypatch):
    with pytest.raises(SystemExit, match="ShapeWorld MM-Vet-style items only"):
        eval_mllm("--bench", str(bench), "--judge", "rule", "--protocol", "mt-bench")
    with pytest.raises(SystemExit, match="needs --base-url"):
        eval_mllm("--bench", str(bench), "--judge", "http", "--judge-model", "m")
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(JudgeRequestError, match="HTTP 401"):
        eval_mllm("--bench", str(bench), "--judge", "http", "--base-url", server.url("auth"), "--judge-model", "m",
                  "--api-key-env", KEY_ENV, "--out", str(tmp_path / "x.json"), "--limit", "2")
    assert not (tmp_path / "x.json").exists()
