"""Judges: the OpenAI-compatible HTTP judge against a chat-completions server started by the test (timeouts,
retries, 429 Retry-After, 4xx, garbage, the per-request deadline against dripping servers, the response-size
cap), the grading layer's temperature-bumped retries, the rule judge and a
local transformers judge on tiny models built from configs."""
import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmalign.cli import build_parser
from mmalign.core.config import ConfigError
from mmalign.evals.cli_mllm import judge_settings
from mmalign.evals.judge_http import HTTPJudge, content_of, retry_after_seconds
from mmalign.evals.judges import (JudgeRequestError, JudgeResponseError, LocalJudge, RuleJudge,
                                  grade_with_retries)
from mmalign.evals.mllm_bench import make_judge
from mmalign.evals.mmvet import parse_grade
from mmalign.evals.mtbench import parse_rating

MSGS = [{"role": "system", "content": "grade"}, {"role": "user", "content": "| q | a | a |"}]


def completion(text) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


def grader_reply(body: dict) -> str:
    """A deterministic judge for end-to-end tests: MT-Bench prompts get [[6]] (turn 1) / [[8]] (later turns),
    LLaVA-Bench prompts "8 6", MM-Vet prompts 1.0 when the open row's prediction contains the truth, else 0.0."""
    text = body["messages"][-1]["content"]
    if "[[6]]" in text:
        return "Fine. Rating: [[8]]" if "(turn 2)" in text else "Good. Rating: [[6]]"
    if "[Assistant 2]" in text:
        return "8 6\nAssistant 1 is more detailed."
    row = [c.strip() for c in text.splitlines()[-2].strip("|").split("|")]
    return "1.0" if row[1].lower() in row[2].lower() else "0.0"


class ChatServer:
    """Chat-completions on 127.0.0.1:<free port>; behaviour chosen by the path prefix /<scenario>/v1/...
    Calls, request bodies and headers are recorded per scenario."""

    def __init__(self):
        self.calls, self.bodies, self.headers = Counter(), defaultdict(list), defaultdict(list)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body=b"", headers=()):
                try:
                    self.send_response(code)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                scenario = self.path.strip("/").split("/")[0]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls[scenario] += 1
                    n = server.calls[scenario]
                    server.bodies[scenario].append(body)
                    server.headers[scenario].append(dict(self.headers))
                if not self.path.endswith("/v1/chat/completions"):
                    return self.send(404, b'{"error": "no such route"}')
                if scenario == "ok":
                    return self.send(200, completion("0.8"))
                if scenario == "slow":
                    time.sleep(1.0)
                    return self.send(200, completion("0.8"))
                if scenario == "flaky":
                    return self.send(500, b"upstream exploded") if n == 1 else self.send(200, completion("0.3"))
                if scenario == "ratelimit":
                    return (self.send(429, b'{"error": "slow down"}', [("Retry-After", "7")]) if n == 1
                            else self.send(200, completion("0.6")))
                if scenario == "auth":
                    return self.send(401, b'{"error": {"message": "invalid api key"}}')
                if scenario == "garbage":
                    return self.send(200, b"<html>502 proxy error</html>")
                if scenario == "nofields":
                    return self.send(200, b'{"id": "x", "choices": []}')
                if scenario == "unparsable":
                    return self.send(200, completion("The answer is quite good overall."))
                if scenario == "grader":
                    return self.send(200, completion(grader_reply(body)))
                if scenario.startswith("drip-"):
                    return self.drip(scenario == "drip-headers")
                if scenario == "huge-sized":  # declares 50 kB, then stalls: a capped client reads none of it
                    return self.stall(b"HTTP/1.0 200 OK\r\nContent-Length: 50000\r\n\r\n" + b" " * 100)
                if scenario == "huge-unsized":  # 50 kB, no length, then stalls: a capped client stops at the cap
                    return self.stall(b"HTTP/1.0 200 OK\r\n\r\n" + completion("x" * 50_000))
                return self.send(400, b'{"error": "unknown scenario"}')

            def drip(self, in_headers: bool):
                """One byte every 0.2 s: of the headers, or of the body after complete headers."""
                head = b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"
                sent, dripped = (b"", head) if in_headers else (head, completion("0.8").ljust(1000))
                try:
                    self.wfile.write(sent)
                    for i in range(len(dripped)):
                        self.wfile.write(dripped[i:i + 1])
                        time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client cut the connection at its deadline

            def stall(self, raw: bytes):
                try:
                    self.wfile.write(raw)
                    time.sleep(5.0)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{scenario}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("MMALIGN_TEST_JUDGE_KEY", "sk-test-123")
    return "MMALIGN_TEST_JUDGE_KEY"


def judge_for(server, scenario, key, sleeps=None, **kw):
    return HTTPJudge(server.url(scenario), "judge-model", api_key_env=key,
                     sleep=(sleeps.append if sleeps is not None else (lambda s: None)), **kw)


def test_normal_answer_sends_the_protocol_and_the_key_from_the_named_variable(server, key):
    judge = judge_for(server, "ok", key)
    assert judge.complete(MSGS, temperature=0.4, seed=11) == "0.8"
    body, headers = server.bodies["ok"][-1], server.headers["ok"][-1]
    assert body == {"model": "judge-model", "messages": MSGS, "temperature": 0.4, "max_tokens": 256, "seed": 11}
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert "sk-test" not in judge.id and judge.id.startswith("http:judge-model@")
    assert judge_for(server, "ok", key, send_seed=False).complete(MSGS, seed=11) == "0.8"
    assert "seed" not in server.bodies["ok"][-1]  # for servers that reject the field


def test_no_key_variable_sends_no_authorization_and_a_missing_variable_is_a_clear_error(server, monkeypatch):
    before = server.calls["ok"]
    assert HTTPJudge(server.url("ok"), "m", api_key_env=None).complete(MSGS) == "0.8"
    assert "Authorization" not in server.headers["ok"][-1]
    monkeypatch.delenv("MMALIGN_UNSET_KEY", raising=False)
    with pytest.raises(JudgeRequestError, match=r"\$MMALIGN_UNSET_KEY is not set"):
        HTTPJudge(server.url("ok"), "m", api_key_env="MMALIGN_UNSET_KEY").complete(MSGS)
    assert server.calls["ok"] == before + 1  # the refused call never reached the server


def test_slow_response_times_out_and_is_retried_a_bounded_number_of_times(server, key):
    sleeps = []
    judge = judge_for(server, "slow", key, sleeps, timeout=0.2, max_retries=2, backoff=0.5)
    t0 = time.time()
    with pytest.raises(JudgeResponseError, match="no usable answer after 3 tries.*timed out"):
        judge.complete(MSGS)
    assert time.time() - t0 < 3  # three 0.2 s timeouts, back-off sleeps injected
    assert server.calls["slow"] == 3 and sleeps == [0.5, 1.0]  # exponential back-off between tries


@pytest.mark.parametrize("scenario, retries", [("drip-body", 0), ("drip-headers", 1)])
def test_a_dripping_server_is_cut_at_the_deadline_and_retried_like_a_timeout(server, key, scenario, retries):
    sleeps = []
    judge = judge_for(server, scenario, key, sleeps, timeout=5.0, deadline=1.0, max_retries=retries, backoff=0.5)
    t0 = time.monotonic()
    with pytest.raises(JudgeResponseError, match=f"after {retries + 1} tries.*within the 1s deadline"):
        judge.complete(MSGS)
    elapsed = time.monotonic() - t0
    # a byte every 0.2 s never trips the 5 s socket timeout: only the 1 s deadline per try ends it
    assert retries + 1 - 0.05 < elapsed < retries + 2
    assert server.calls[scenario] == retries + 1 and sleeps == [0.5] * retries


@pytest.mark.parametrize("scenario, what", [("huge-sized", "Content-Length 50000"), ("huge-unsized", "body")])
def test_a_body_over_the_cap_is_refused_unread_and_not_retried(server, key, scenario, what):
    judge = judge_for(server, scenario, key, timeout=30.0, deadline=30.0, max_response_bytes=1000)
    t0 = time.monotonic()
    with pytest.raises(JudgeResponseError, match=f"its {what} exceeds the cap of 1000 bytes"):
        judge.complete(MSGS)
    assert time.monotonic() - t0 < 2  # the server then stalls 5 s: the client stopped reading at the cap
    assert server.calls[scenario] == 1


def test_a_body_at_the_cap_is_read(server, key):
    size = len(completion("0.8"))
    assert judge_for(server, "ok", key, max_response_bytes=size, deadline=5.0).complete(MSGS) == "0.8"
    with pytest.raises(JudgeResponseError, match=f"Content-Length {size} exceeds the cap of {size - 1} bytes"):
        judge_for(server, "ok", key, max_response_bytes=size - 1).complete(MSGS)


def test_deadline_and_cap_settings_are_checked_and_reach_the_judge_from_the_command_line():
    for bad in ({"deadline": 0}, {"deadline": float("inf")}, {"timeout": -1.0}, {"timeout": float("nan")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive number of seconds"):
            HTTPJudge("http://127.0.0.1:9/v1", "m", **bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_response_bytes must be a positive whole number"):
            HTTPJudge("http://127.0.0.1:9/v1", "m", max_response_bytes=bad)
    args = ["eval", "mllm", "--model", "m", "--bench", "b.jsonl", "--judge", "http", "--judge-model", "jm",
            "--base-url", "http://127.0.0.1:9/v1"]
    judge = make_judge(judge_settings(build_parser().parse_args(args)), "mmvet")
    assert (judge.deadline, judge.max_response_bytes, judge.timeout) == (120.0, 4_000_000, 60.0)  # defaults
    a = build_parser().parse_args(args + ["--judge-deadline", "7.5", "--judge-max-response-bytes", "1234"])
    judge = make_judge(judge_settings(a), "mmvet")
    assert (judge.deadline, judge.max_response_bytes) == (7.5, 1234)
    a = build_parser().parse_args(args + ["--judge-deadline", "0"])
    with pytest.raises(ConfigError, match="--judge http: deadline must be a positive number of seconds, got 0.0"):
        make_judge(judge_settings(a), "mmvet")


def test_server_error_then_success(server, key):
    sleeps = []
    assert judge_for(server, "flaky", key, sleeps, backoff=2.0).complete(MSGS) == "0.3"
    assert server.calls["flaky"] == 2 and sleeps == [2.0]


def test_429_waits_retry_after(server, key):
    sleeps = []
    assert judge_for(server, "ratelimit", key, sleeps, backoff=0.1).complete(MSGS) == "0.6"
    assert server.calls["ratelimit"] == 2 and sleeps == [7.0]


def test_401_is_a_clear_error_without_retries(server, key):
    sleeps = []
    with pytest.raises(JudgeRequestError, match=r"HTTP 401 — check \$MMALIGN_TEST_JUDGE_KEY.*invalid api key"):
        judge_for(server, "auth", key, sleeps, max_retries=4).complete(MSGS)
    assert server.calls["auth"] == 1 and sleeps == []


@pytest.mark.parametrize("scenario, message", [("garbage", "not JSON"), ("nofields", "lacks choices")])
def test_garbage_bodies_are_counted_failures_of_the_grading_layer(server, key, scenario, message):
    with pytest.raises(JudgeResponseError, match=message):
        judge_for(server, scenario, key).complete(MSGS)
    assert server.calls[scenario] == 1  # a 200 is not retried by the transport
    out = grade_with_retries(judge_for(server, scenario, key), MSGS, parse_grade)
    assert out.parse_failed and out.tries == 5 and server.calls[scenario] == 6
    assert all(o.startswith("<judge error:") for o in out.outputs)


def test_unparsable_score_retries_with_temperature_bumped_then_counts_a_failure(server, key):
    out = grade_with_retries(judge_for(server, "unparsable", key), MSGS, parse_grade, temperature=0.1, seed=5)
    assert out.score is None and out.parse_failed and out.tries == 5 and server.calls["unparsable"] == 5
    sent = [(b["temperature"], b["seed"]) for b in server.bodies["unparsable"]]
    assert sent == [(0.1, 5), (0.3, 6), (0.5, 7), (0.7, 8), (0.9, 9)]
    assert out.temperatures == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_retry_after_forms_and_content_of():
    assert retry_after_seconds("12") == 12.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == pytest.approx(30.0)
    assert content_of(completion("hi")) == "hi"
    with pytest.raises(JudgeResponseError, match="not text"):
        content_of(b'{"choices": [{"message": {"content": null}}]}')


class Scripted:
    id = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def complete(self, messages, temperature=0.0, seed=None):
        self.seen.append((temperature, seed))
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            raise r
        return r


def test_grading_layer_stops_at_the_first_parse_and_propagates_request_errors():
    j = Scripted(["no idea", JudgeResponseError("timeout"), "0.25 because"])
    out = grade_with_retries(j, MSGS, parse_grade, temperature=0.0, step=0.2, seed=None)
    assert out.score == 0.25 and out.tries == 3 and j.seen == [(0.0, None), (0.2, None), (0.4, None)]
    assert out.outputs[1] == "<judge error: timeout>"
    with pytest.raises(JudgeRequestError):
        grade_with_retries(Scripted([JudgeRequestError("401")]), MSGS, parse_grade)
    with pytest.raises(ValueError, match="tries"):
        grade_with_retries(j, MSGS, parse_grade, tries=0)


def test_rule_judge_wraps_the_shapeworld_grader():
    rule = RuleJudge()
    assert rule.grade("How many circles are there?", "2", "two circles", "count") == 1.0
    assert rule.grade("How many circles are there?", "2", "2 or 3", "count") == 0.0
    assert rule.grade("What colour is the square?", "red", "It is red.", "colour") == 1.0
    assert rule.grade("Describe the image.", "a red circle", "a red circle and a blue square", "description") \
        == pytest.approx(2 * 1 * 0.5 / 1.5)
    with pytest.raises(ValueError, match="ShapeWorld questions only"):
        rule.grade("q", "a", "a", "ocr")


@pytest.mark.usefixtures("one_thread")
def test_local_judge_on_tiny_llava_is_reproducible_and_its_garbage_is_a_counted_failure(tiny_llava_dir):
    judge = LocalJudge(tiny_llava_dir, max_new_tokens=8)
    assert judge.id == f"local:{tiny_llava_dir}"
    greedy = judge.complete(MSGS)
    assert isinstance(greedy, str) and judge.complete(MSGS) == greedy
    assert judge.complete(MSGS, temperature=1.0, seed=3) == judge.complete(MSGS, temperature=1.0, seed=3)
    # the word-level vocabulary has no brackets: an MT-Bench "[[x]]" rating can never parse
    out = grade_with_retries(judge, MSGS, parse_rating, seed=0)
    assert out.parse_failed and out.tries == 5 and len(out.outputs) == 5
    # with the MM-Vet parser, whatever happens is consistent: earlier outputs unparsable, the last decides
    out = grade_with_retries(judge, MSGS, parse_grade, seed=0)
    assert all(parse_grade(o) is None for o in out.outputs[:-1])
    assert out.score == parse_grade(out.outputs[-1])


@pytest.mark.usefixtures("one_thread")
def test_local_judge_loads_a_causal_lm_directory(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign.mllm.tiny import chat_tokenizer

    tok = chat_tokenizer(["0", "1", ".", "5", "good"], model_max_length=256)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = LocalJudge(str(tmp_path), max_new_tokens=4)
    assert type(judge.model).__name__ == "LlamaForCausalLM"
    text = judge.complete(MSGS)
    assert set(text.split()) <= {"0", "1", ".", "5", "good", "<unk>", ""}
