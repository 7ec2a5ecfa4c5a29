"""The lmms-eval-like results file: layout, validation, sample files, read-back."""
import json

import pytest

from mmalign.evals.results import TaskResult, metric_value, read_results, write_results


def test_results_layout_and_read_back(tmp_path):
    t = TaskResult(metrics={"accuracy": 0.75, "f1": 0.5}, higher_is_better={"accuracy": True, "f1": True},
                   n_original=4, n_effective=3, stderr={"accuracy": 0.1}, config={"judge": "rule"},
                   samples=[{"id": 1, "score": 1.0}, {"id": 2, "score": 0.0}], extra={"ci95": [0.5, 1.0]})
    path = write_results(tmp_path / "r.json", {"pope": t}, model="m", provenance={"seed": 0})
    doc = json.loads(path.read_text())
    assert doc["results"]["pope"] == {"alias": "pope", "accuracy,none": 0.75, "accuracy_stderr,none": 0.1,
                                      "f1,none": 0.5, "f1_stderr,none": "N/A"}
    assert doc["n-samples"]["pope"] == {"original": 4, "effective": 3}
    assert doc["mmalign"]["provenance"] == {"seed": 0} and doc["mmalign"]["extra"]["pope"]["ci95"] == [0.5, 1.0]
    lines = (tmp_path / "r_samples_pope.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [1, 2]
    back = read_results(path)
    assert back["tasks"]["pope"] == {"accuracy": 0.75, "f1": 0.5}
    assert metric_value(back["doc"], "pope", "f1") == 0.5
    with pytest.raises(KeyError, match="no metric 'recall'"):
        metric_value(back["doc"], "pope", "recall")


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": {"a": float("nan")}, "higher_is_better": {"a": True}, "n_original": 1}, "finite"),
    ({"metrics": {"a": 1.0}, "higher_is_better": {}, "n_original": 1}, "missing"),
    ({"metrics": {"a": 1.0}, "higher_is_better": {"a": True}, "n_original": 1, "n_effective": 2}, "n_effective"),
])
def test_task_result_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskResult(**kwargs)


def test_read_results_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a results file"):
        read_results(tmp_path / "x.json")
