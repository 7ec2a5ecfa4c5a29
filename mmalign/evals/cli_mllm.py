"""`mmalign eval mllm` (MM-Vet-style / LLaVA-Bench-style / MT-Bench-style benchmarks of a vision-language model
with a rule, HTTP or local judge) and `mmalign data shapeworld-bench` (a ShapeWorld MM-Vet-style benchmark).

Nothing heavy is imported at module level: torch and transformers load inside the commands.

ShapeWorld VQA kinds -> MM-Vet capability tags (every kind needs recognising the shapes, hence "rec"):
colour, shape, existence -> rec; count -> rec + math (a numeric answer; MM-Vet itself files plain counting
under rec, so rec_math here means "counting"); spatial -> rec + spat; description -> rec + gen.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .judges import TEMPERATURE_STEP

PROTOCOLS = ("mmvet", "llava-bench", "mt-bench")
SHAPEWORLD_TAGS = {"colour": ["rec"], "shape": ["rec"], "existence": ["rec"], "count": ["rec", "math"],
                   "spatial": ["rec", "spat"], "description": ["rec", "gen"]}


def make_judge(a):
    from .judges import LocalJudge, RuleJudge

    if a.judge == "rule":
        if a.protocol != "mmvet":
            sys.exit(f"--judge rule grades ShapeWorld MM-Vet-style items only, not --protocol {a.protocol}")
        return RuleJudge()
    if not a.judge_model:
        sys.exit(f"--judge {a.judge} needs --judge-model (a model name for http, a directory for local)")
    if a.judge == "local":
        return LocalJudge(a.judge_model, max_new_tokens=a.judge_max_tokens)
    if not a.base_url:
        sys.exit("--judge http needs --base-url (e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)")
    from .judge_http import HTTPJudge
    return HTTPJudge(a.base_url, a.judge_model, api_key_env=a.api_key_env or None, timeout=a.judge_timeout,
                     max_retries=a.judge_retries, max_tokens=a.judge_max_tokens, send_seed=not a.judge_no_seed)


def _prompt(item):
    from PIL import Image

    content = [{"type": "text", "text": item.question}]
    if item.image is None:
        return [], [{"role": "user", "content": content}]
    with Image.open(item.image) as im:
        image = im.convert("RGB")
    return [image], [{"role": "user", "content": [{"type": "image"}] + content}]


def _finite(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def eval_mmvet(items, preds, judge, a) -> dict:
    from .mmvet import grade_predictions, item_means, summarize_runs
    from .pope import pope_table
    from .results import TaskResult

    graded = grade_predictions(items, preds, judge, runs=a.judge_runs, temperature=a.judge_temperature,
                               tries=a.judge_tries, seed=a.seed)
    s = summarize_runs(graded, items)
    metrics = {"total": s["total"]["mean"], **{k: v["mean"] for k, v in s["capabilities"].items()},
               "parse_failures": s["parse_failures"]}
    means = item_means(graded)
    samples = [{"id": it.id, "question": it.question, "answer": it.answer, "prediction": p,
                "capabilities": list(it.capabilities), "type": it.type, "score": m,
                "grades": [r[i] for r in graded["grades"]], "parse_failed": [r[i] for r in graded["parse_failed"]],
                "judge_outputs": [r[i] for r in graded["outputs"]]}
               for i, (it, p, m) in enumerate(zip(items, preds, means))]
    tasks = {"mmvet": TaskResult(
        metrics, {k: k != "parse_failures" for k in metrics}, len(items), samples=samples,
        config={"protocol": "mmvet", "judge_runs": graded["runs"], "judge_tries": a.judge_tries},
        extra={k: s[k] for k in ("total", "capabilities", "combinations", "n", "runs", "parse_failures_per_run")})}
    pope = pope_table(items, preds)
    if pope:
        m = {k: pope["all"][k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        # yes_ratio: 0.5 is ideal for balanced items; marked not-higher-is-better
        tasks["pope"] = TaskResult(m, {k: k != "yes_ratio" for k in m}, pope["all"]["n"],
                                   extra={"splits": pope, "unparsed": pope["all"]["unparsed"]})
    return tasks


def eval_llava(items, preds, judge, a) -> dict:
    from .llava_bench import rate_items, relative_scores
    from .results import TaskResult

    outcomes = rate_items(items, preds, judge, temperature=a.judge_temperature, tries=a.judge_tries, seed=a.seed)
    table = relative_scores([o.score for o in outcomes], [it.category for it in items])
    metrics = {f"relative_{k}": v["relative"] for k, v in table.items() if k != "parse_failures"}
    metrics["parse_failures"] = table["parse_failures"]
    samples = [{"id": it.id, "question": it.question, "answer": it.answer, "prediction": p, "category": it.category,
                "score": None if o.score is None else o.score[1], "ratings": o.score, "judge_outputs": o.outputs}
               for it, p, o in zip(items, preds, outcomes)]
    return {"llava_bench": TaskResult(metrics, {k: k != "parse_failures" for k in metrics}, len(items),
                                      samples=samples, config={"protocol": "llava-bench"}, extra={"table": table})}


def eval_mtbench(questions, answers, judge, a) -> dict:
    from .mtbench import grade_answers, summarize
    from .results import TaskResult

    records = grade_answers(questions, answers, judge, temperature=a.judge_temperature, tries=a.judge_tries,
                            seed=a.seed)
    s = summarize(records)
    metrics = _finite({"score": s["score"], **{f"turn_{t}": v for t, v in s["turns"].items()}})
    metrics["parse_failures"] = s["parse_failures"]
    return {"mt_bench": TaskResult(metrics, {k: k != "parse_failures" for k in metrics}, s["n"], samples=records,
                                   config={"protocol": "mt-bench"}, extra=s)}


TASK_OF = {"mmvet": "mmvet", "llava-bench": "llava_bench", "mt-bench": "mt_bench"}


def paired_comparison(base: dict[str, float | None], new: dict[str, float | None], n_boot: int, seed: int) -> dict:
    """Paired bootstrap CI of new - base over the item ids both have scored (others counted, not used)."""
    from ..core.stats import paired_gain_ci

    ids = [i for i in new if new[i] is not None and base.get(i) is not None]
    if not ids:
        raise ValueError("no item scored in both runs: nothing to compare (different benchmarks?)")
    g, lo, hi = paired_gain_ci([new[i] for i in ids], [base[i] for i in ids], n_boot=n_boot, seed=seed)
    return {"n_paired": len(ids), "unpaired": len(set(new) | set(base)) - len(ids),
            "base_mean": sum(base[i] for i in ids) / len(ids), "new_mean": sum(new[i] for i in ids) / len(ids),
            "gain": g, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}


def sample_scores(results_path, task: str) -> dict:
    path = Path(results_path)
    samples = path.with_name(f"{path.stem}_samples_{task}.jsonl")
    if not samples.is_file():
        raise FileNotFoundError(f"--compare: {samples} not found (needs the per-sample file of task {task!r})")
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {r["id"]: r["score"] for r in rows}


def run_one(model_src: str, bench, report, judge, a, out: Path) -> tuple[Path, dict]:
    from ..mllm.generate import generate_answers
    from ..mllm.models import load_vlm
    from .results import write_results

    model, processor = load_vlm(model_src)
    if a.protocol == "mt-bench":
        from .mtbench import answer_questions
        answers = answer_questions(model, processor, bench, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
        tasks = eval_mtbench(bench, answers, judge, a)
    else:
        preds = generate_answers(model, processor, [_prompt(it) for it in bench], max_new_tokens=a.max_new_tokens,
                                 batch_size=a.batch_size)
        tasks = (eval_mmvet if a.protocol == "mmvet" else eval_llava)(bench, preds, judge, a)
    task = TASK_OF[a.protocol]
    provenance = {"model": model_src, "bench": str(a.bench),
                  "bench_sha1": hashlib.sha1(Path(a.bench).read_bytes()).hexdigest(), "protocol": a.protocol,
                  "judge": judge.id, "judge_temperature": a.judge_temperature, "judge_temperature_step": TEMPERATURE_STEP,
                  "judge_tries": a.judge_tries, "judge_runs": tasks[task].config.get("judge_runs", 1),
                  "api_key_env": a.api_key_env if a.judge == "http" else None, "seeds": {"judge": a.seed},
                  "generation": {"greedy": True, "max_new_tokens": a.max_new_tokens},
                  "parse_failures": int(tasks[task].metrics["parse_failures"]), "data": report.to_dict()}
    scores = {s["id"]: s["score"] for s in tasks[task].samples}
    if a.base_scores is not None:
        tasks[task].extra["comparison"] = {"against": a.base_label,
                                           **paired_comparison(a.base_scores, scores, a.n_boot, a.seed)}
    path = write_results(out, tasks, model=model_src, provenance=provenance)
    return path, scores


def cmd_eval_mllm(a) -> None:
    import torch

    from .mmvet import read_bench
    from .mtbench import read_questions

    if a.threads:
        torch.set_num_threads(a.threads)
    if len(a.model) > 2:
        sys.exit("--model: give one model, or two (base then aligned) for a paired comparison")
    if len(a.model) == 2 and a.compare:
        sys.exit("--compare and a second --model both name a baseline; give one of them")
    judge = make_judge(a)
    bench, report = (read_questions if a.protocol == "mt-bench" else read_bench)(a.bench, bad_rows=a.bad_rows)
    bench = bench[:a.limit] if a.limit else bench
    if not bench:
        sys.exit(f"{a.bench}: no usable items ({report.summary()})")
    task, out = TASK_OF[a.protocol], Path(a.out)
    a.base_scores, a.base_label = None, None
    if a.compare:
        a.base_scores, a.base_label = sample_scores(a.compare, task), str(a.compare)
    if len(a.model) == 2:
        base_path, a.base_scores = run_one(a.model[0], bench, report, judge, a,
                                           out.with_name(f"{out.stem}_base{out.suffix}"))
        a.base_label = str(base_path)
    path, _ = run_one(a.model[-1], bench, report, judge, a, out)
    doc = json.loads(path.read_text())
    print(json.dumps({"results": str(path), **doc["results"], "comparison": doc["mmalign"]["extra"].get(task, {})
                      .get("comparison")}, default=str))


def cmd_data_shapeworld_bench(a) -> None:
    from ..mllm.shapeworld import vqa_benchmark

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; choose a new folder")
    (out / "images").mkdir(parents=True)
    names, n = {}, 0
    with open(out / "bench.jsonl", "w") as f:
        for ex in vqa_benchmark(seed=a.seed, n_scenes=a.n, per_scene=a.per_scene, split=a.split or None,
                                image_size=a.resolution):
            key = json.dumps(ex.scene.to_dict(), sort_keys=True)
            if key not in names:
                names[key] = f"images/{len(names):05d}.png"
                ex.image.save(out / names[key])
            kind = ex.item.capability
            f.write(json.dumps({"id": f"sw{n:05d}", "question": ex.item.question, "image": names[key],
                                "answer": ex.item.answer, "capabilities": SHAPEWORLD_TAGS[kind],
                                "category": kind, "type": kind}) + "\n")
            n += 1
    print(json.dumps({"bench": str(out / "bench.jsonl"), "questions": n, "images": len(names)}))


def register(esub) -> None:
    p = esub.add_parser("mllm", help="benchmark a vision-language model (MM-Vet / LLaVA-Bench / MT-Bench style)",
                        description="Generate greedy answers with a model and grade them with a judge; writes an "
                                    "lmms-eval-style results file. Two --model values (base, aligned) or --compare "
                                    "add a paired bootstrap CI of the per-item score difference.")
    p.add_argument("--model", action="append", required=True, help="model directory or hub id (repeat: base, aligned)")
    p.add_argument("--bench", required=True, help="benchmark jsonl (MT-Bench layout for --protocol mt-bench)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="mmvet")
    p.add_argument("--judge", choices=("rule", "http", "local"), required=True)
    p.add_argument("--judge-model", help="http: the model name; local: a model directory")
    p.add_argument("--base-url", help="http: the OpenAI-compatible API root (…/v1)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="http: NAME of the environment variable holding the key ('' for none)")
    p.add_argument("--judge-runs", type=int, default=1, help="mmvet: judge runs (mean and std per capability)")
    p.add_argument("--judge-temperature", type=float, default=0.0, help="first try; +0.2 per retry")
    p.add_argument("--judge-tries", type=int, default=5)
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--judge-retries", type=int, default=4, help="http: retries of a failed request")
    p.add_argument("--judge-max-tokens", type=int, default=256)
    p.add_argument("--judge-no-seed", action="store_true", help="http: do not send the 'seed' field (for servers "
                                                                   "that reject it; sampling is then not reproducible)")
    p.add_argument("--compare", help="results file of a baseline run on the same benchmark (paired CI)")
    p.add_argument("--out", default="runs/eval_mllm/results.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="first N items only (0: all)")
    p.add_argument("--bad-rows", choices=("skip", "error"), default="error")
    p.add_argument("--seed", type=int, default=0, help="judge sampling seed (retries and runs derive from it)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=cmd_eval_mllm)


def register_data(dsub) -> None:
    q = dsub.add_parser("shapeworld-bench", help="write a ShapeWorld MM-Vet-style benchmark (bench.jsonl + images)",
                        description="Held-out ShapeWorld scenes and exact VQA as an `eval mllm` benchmark; "
                                    "capabilities are MM-Vet tags, type is the ShapeWorld kind the rule judge uses.")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, required=True, help="number of scenes")
    q.add_argument("--per-scene", type=int, default=6, help="questions per scene (at most)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", choices=("heldout", "train", ""), default="heldout", help="caption split ('' = any)")
    q.add_argument("--resolution", type=int, default=32)
    q.set_defaults(fn=cmd_data_shapeworld_bench)
