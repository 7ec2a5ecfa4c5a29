"""`mmalign eval mllm` (benchmarks of a vision-language model, `evals.mllm_bench`) and `mmalign data
shapeworld-bench` (a ShapeWorld MM-Vet-style benchmark, `evals.shapeworld_bench`): the namespace becomes settings,
the results are printed. Nothing heavy is imported at module level: torch and transformers load inside the commands.
"""
from __future__ import annotations

import json

from .judge_http import DEADLINE, MAX_RESPONSE_BYTES
from .mllm_bench import PROTOCOLS


def judge_settings(a):
    from .mllm_bench import JudgeSettings

    return JudgeSettings(a.judge, model=a.judge_model, base_url=a.base_url, api_key_env=a.api_key_env,
                         runs=a.judge_runs, temperature=a.judge_temperature, tries=a.judge_tries,
                         timeout=a.judge_timeout, retries=a.judge_retries, max_tokens=a.judge_max_tokens,
                         send_seed=not a.judge_no_seed, deadline=a.judge_deadline,
                         max_response_bytes=a.judge_max_response_bytes)


def cmd_eval_mllm(a) -> None:
    import torch

    from .mllm_bench import MLLMEvalSettings, evaluate_mllm
    from .mllm_tasks import TASK_OF

    if a.threads:
        torch.set_num_threads(a.threads)
    settings = MLLMEvalSettings(a.model, a.bench, judge_settings(a), protocol=a.protocol, compare=a.compare,
                                out=a.out, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, limit=a.limit,
                                bad_rows=a.bad_rows, seed=a.seed, n_boot=a.n_boot)
    path, _ = evaluate_mllm(settings)
    doc = json.loads(path.read_text())
    comparison = doc["mmalign"]["extra"].get(TASK_OF[a.protocol], {}).get("comparison")
    print(json.dumps({"results": str(path), **doc["results"], "comparison": comparison}, default=str))


def cmd_data_shapeworld_bench(a) -> None:
    from .shapeworld_bench import ShapeWorldBenchSettings, write_shapeworld_bench

    print(json.dumps(write_shapeworld_bench(ShapeWorldBenchSettings(
        a.out, a.n, per_scene=a.per_scene, seed=a.seed, split=a.split, resolution=a.resolution))))


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
    p.add_argument("--judge-timeout", type=float, default=60.0, help="http: seconds of silence on the socket")
    p.add_argument("--judge-deadline", type=float, default=DEADLINE,
                   help="http: seconds per request in all (connect, headers, body); a try past it is cut")
    p.add_argument("--judge-max-response-bytes", type=int, default=MAX_RESPONSE_BYTES,
                   help="http: a larger response is refused (a failed try)")
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
    q.add_argument("--split", choices=("heldout", "validation", "test", "train", ""), default="heldout",
                   help="caption split ('' = any; validation and test are the halves of heldout)")
    q.add_argument("--resolution", type=int, default=32)
    q.set_defaults(fn=cmd_data_shapeworld_bench)
