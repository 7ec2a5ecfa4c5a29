"""MM-Vet-style / LLaVA-Bench-style / MT-Bench-style benchmarks of vision-language models (`mmalign eval mllm`):
settings in, lmms-eval-style results files out. Greedy answers from each model, graded by a rule, HTTP or local
judge; two models (base, aligned) or a baseline results file add a paired bootstrap CI of the per-item gain.

Torch and transformers are imported only inside the calls.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .errors import EvalError
from .judge_http import DEADLINE, MAX_RESPONSE_BYTES
from .judges import TEMPERATURE_STEP, TRIES
from .mllm_tasks import TASK_OF, item_scores, llava_bench_tasks, mmvet_tasks, mt_bench_tasks, paired_comparison

Protocol = Literal["mmvet", "llava-bench", "mt-bench"]
PROTOCOLS = get_args(Protocol)


@dataclass
class JudgeSettings:
    kind: Literal["rule", "http", "local"]  # rule: the exact ShapeWorld grader (mmvet protocol only)
    model: str | None = None  # http: the model name; local: a model directory
    base_url: str | None = None  # http: the OpenAI-compatible API root (…/v1)
    api_key_env: str = "OPENAI_API_KEY"  # http: NAME of the environment variable holding the key ('' for none)
    runs: int = 1  # mmvet: judge runs (mean and std per capability)
    temperature: float = 0.0  # first try; + TEMPERATURE_STEP per retry
    tries: int = TRIES
    timeout: float = 60.0  # http: seconds of silence on the socket
    deadline: float = DEADLINE  # http: seconds per request in all (connect, headers, body)
    max_response_bytes: int = MAX_RESPONSE_BYTES  # http: a larger response is refused
    retries: int = 4  # http: retries of a failed request
    max_tokens: int = 256
    send_seed: bool = True  # http: send the 'seed' field (sampling is not reproducible without it)


@dataclass
class MLLMEvalSettings:
    models: list[str]  # one model, or two (base then aligned) for a paired comparison
    bench: str | Path  # benchmark jsonl (MT-Bench layout for protocol mt-bench)
    judge: JudgeSettings
    protocol: Protocol = "mmvet"
    compare: str | Path | None = None  # results file of a baseline run on the same benchmark
    out: str | Path = "runs/eval_mllm/results.json"
    max_new_tokens: int = 64
    batch_size: int = 16
    limit: int = 0  # first N items only (0: all)
    bad_rows: Literal["skip", "error"] = "error"
    seed: int = 0  # judge sampling seed (retries and runs derive from it), also the bootstrap seed
    n_boot: int = 2000


@dataclass
class Baseline:
    label: str  # what the comparison is against: a results path
    scores: dict  # {item id: score}


def make_judge(s: JudgeSettings, protocol: str):
    from ..core.config import ConfigError
    from .judges import LocalJudge, RuleJudge

    if s.kind == "rule":
        if protocol != "mmvet":
            raise ConfigError(f"--judge rule grades ShapeWorld MM-Vet-style items only, not --protocol {protocol}")
        return RuleJudge()
    if not s.model:
        raise ConfigError(f"--judge {s.kind} needs --judge-model (a model name for http, a directory for local)")
    if s.kind == "local":
        return LocalJudge(s.model, max_new_tokens=s.max_tokens)
    if not s.base_url:
        raise ConfigError("--judge http needs --base-url (e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)")
    from .judge_http import HTTPJudge
    try:
        return HTTPJudge(s.base_url, s.model, api_key_env=s.api_key_env or None, timeout=s.timeout,
                         max_retries=s.retries, max_tokens=s.max_tokens, send_seed=s.send_seed, deadline=s.deadline,
                         max_response_bytes=s.max_response_bytes)
    except ValueError as e:
        raise ConfigError(f"--judge http: {e}") from None


def chat_prompt(item):
    """(images, messages) asking the item's question, about its image when it has one."""
    from PIL import Image

    content = [{"type": "text", "text": item.question}]
    if item.image is None:
        return [], [{"role": "user", "content": content}]
    with Image.open(item.image) as im:
        image = im.convert("RGB")
    return [image], [{"role": "user", "content": [{"type": "image"}] + content}]


def image_groups(bench) -> dict[str, str]:
    """{item id: its image} for items with an image (questions about one image are compared together)."""
    return {it.id: it.image for it in bench if getattr(it, "image", None)}


def sample_scores(results_path, task: str) -> dict:
    """{item id: score} from the per-sample file beside a results file."""
    path = Path(results_path)
    samples = path.with_name(f"{path.stem}_samples_{task}.jsonl")
    if not samples.is_file():
        raise FileNotFoundError(f"--compare: {samples} not found (needs the per-sample file of task {task!r})")
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {r["id"]: r["score"] for r in rows}


def run_model(model_src: str, bench, report, judge, s: MLLMEvalSettings, out: Path,
              baseline: Baseline | None) -> tuple[Path, dict]:
    """Answer the bench with one model, grade, write the results file; returns (path, {task: TaskResult})."""
    from ..mllm.generate import generate_answers
    from ..mllm.models import load_vlm
    from .results import write_results

    js = s.judge
    model, processor = load_vlm(model_src)
    if s.protocol == "mt-bench":
        from .mtbench import answer_questions
        answers = answer_questions(model, processor, bench, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        tasks = mt_bench_tasks(bench, answers, judge, js, s.seed)
    else:
        preds = generate_answers(model, processor, [chat_prompt(it) for it in bench],
                                 max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        tasks = (mmvet_tasks if s.protocol == "mmvet" else llava_bench_tasks)(bench, preds, judge, js, s.seed)
    task = tasks[TASK_OF[s.protocol]]
    provenance = {"model": model_src, "bench": str(s.bench),
                  "bench_sha1": hashlib.sha1(Path(s.bench).read_bytes()).hexdigest(), "protocol": s.protocol,
                  "judge": judge.id, "judge_temperature": js.temperature, "judge_temperature_step": TEMPERATURE_STEP,
                  "judge_tries": js.tries, "judge_runs": task.config.get("judge_runs", 1),
                  "api_key_env": js.api_key_env if js.kind == "http" else None, "seeds": {"judge": s.seed},
                  "generation": {"greedy": True, "max_new_tokens": s.max_new_tokens},
                  "parse_failures": int(task.metrics["parse_failures"]), "data": report.to_dict()}
    if baseline is not None:
        task.extra["comparison"] = {"against": baseline.label,
                                    **paired_comparison(baseline.scores, item_scores(task), s.n_boot, s.seed,
                                                        groups=image_groups(bench))}
    return write_results(out, tasks, model=model_src, provenance=provenance), tasks


def evaluate_mllm(s: MLLMEvalSettings) -> tuple[Path, dict]:
    """Benchmark the last model (after the base, when two are given); returns its (results path, tasks)."""
    from ..core.config import ConfigError
    from .mmvet import read_bench
    from .mtbench import read_questions

    if not 1 <= len(s.models) <= 2:
        raise ConfigError("--model: give one model, or two (base then aligned) for a paired comparison")
    if len(s.models) == 2 and s.compare:
        raise ConfigError("--compare and a second --model both name a baseline; give one of them")
    judge = make_judge(s.judge, s.protocol)
    bench, report = (read_questions if s.protocol == "mt-bench" else read_bench)(s.bench, bad_rows=s.bad_rows)
    bench = bench[:s.limit] if s.limit else bench
    if not bench:
        raise EvalError(f"{s.bench}: no usable items ({report.summary()})")
    task, out = TASK_OF[s.protocol], Path(s.out)
    baseline = Baseline(str(s.compare), sample_scores(s.compare, task)) if s.compare else None
    if len(s.models) == 2:
        base_path, base_tasks = run_model(s.models[0], bench, report, judge, s,
                                          out.with_name(f"{out.stem}_base{out.suffix}"), None)
        baseline = Baseline(str(base_path), item_scores(base_tasks[task]))
    return run_model(s.models[-1], bench, report, judge, s, out, baseline)
