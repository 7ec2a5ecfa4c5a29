"""Judges for model-graded benchmarks, behind one small interface, and the grading layer on top.

A chat judge has an ``id`` (recorded in results) and ``complete(messages, temperature, seed) -> text``;
``messages`` are OpenAI-style ``[{"role": "system"|"user"|"assistant", "content": str}]``. Kinds:

- ``HTTPJudge`` (judge_http.py): any OpenAI-compatible ``/chat/completions`` endpoint.
- ``LocalJudge``: a transformers causal-LM (or image-text model) directory with a chat-template tokenizer.
- ``RuleJudge``: not a language model — the exact ShapeWorld VQA grader; harnesses call ``grade`` directly and
  skip the LLM prompt for it.

The grading layer (``grade_with_retries``) asks a chat judge, parses a score from its text and, on a parse
failure (or a garbage response, ``JudgeResponseError``), asks again with the temperature raised by ``step``
per try; after ``tries`` failures the outcome is a counted parse failure, never a silent score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

TRIES = 5  # MM-Vet: five tries, then the score is 0 and the item counts as a parse failure
TEMPERATURE_STEP = 0.2


class JudgeResponseError(RuntimeError):
    """The judge answered, but not usably (non-JSON, missing fields) or not at all after the retries (timeouts,
    5xx). Counted as a failed try by the grading layer."""


class JudgeRequestError(RuntimeError):
    """The judge refused the request (HTTP 4xx other than 429: bad key, unknown model, bad payload). Retrying
    cannot help; the run stops with this message."""


class ChatJudge(Protocol):
    id: str

    def complete(self, messages: list[dict], temperature: float = 0.0, seed: int | None = None) -> str: ...


@dataclass
class GradeOutcome:
    """The parsed score (None after `tries` failures), how many tries it took, and every raw judge output (or
    the error text of a failed response) in order."""
    score: float | None
    tries: int
    outputs: list[str] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)

    @property
    def parse_failed(self) -> bool:
        return self.score is None


def grade_with_retries(judge: ChatJudge, messages: list[dict], parse: Callable[[str], object | None],
                       temperature: float = 0.0, step: float = TEMPERATURE_STEP, tries: int = TRIES,
                       seed: int | None = None) -> GradeOutcome:
    """Try k = 0..tries-1 at temperature `temperature + k*step` (seed `seed + k` when given) until
    `parse(text)` returns non-None. A `JudgeResponseError` counts as a failed try; a `JudgeRequestError`
    propagates."""
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    out = GradeOutcome(None, 0)
    for k in range(tries):
        t = round(temperature + k * step, 6)
        out.tries, out.temperatures = k + 1, out.temperatures + [t]
        try:
            text = judge.complete(messages, temperature=t, seed=None if seed is None else seed + k)
        except JudgeResponseError as e:
            out.outputs.append(f"<judge error: {e}>")
            continue
        out.outputs.append(text)
        score = parse(text)
        if score is not None:
            out.score = score
            return out
    return out


class RuleJudge:
    """Exact ShapeWorld VQA grading (`mmalign.datasets.shapeworld.vqa.grade`, 0..1) of a prediction, given the
    item's ShapeWorld kind (colour, shape, count, spatial, existence, description)."""

    id = "rule:shapeworld_vqa"

    def grade(self, question: str, truth: str, prediction: str, kind: str) -> float:
        from ..datasets.shapeworld.vqa import CAPABILITIES, VQAItem, grade

        if kind not in CAPABILITIES:
            raise ValueError(f"the rule judge grades ShapeWorld questions only: type {kind!r} is not one of "
                             f"{CAPABILITIES} (use an LLM judge for other benchmarks)")
        return grade(VQAItem(question, truth, kind), prediction)


class LocalJudge:
    """A judge running a local transformers model: a causal LM (AutoModelForCausalLM) or an image-text model
    used on text only (AutoModelForImageTextToText), with the directory's tokenizer and its chat template.
    Greedy at temperature 0, otherwise sampling at that temperature with `torch.manual_seed(seed)`."""

    def __init__(self, source: str, max_new_tokens: int = 128, dtype: str = "fp32"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(source)
        auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText
        self.model = auto.from_pretrained(source, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{source}: the tokenizer has no chat template; a judge needs one")
        self.max_new_tokens = max_new_tokens
        self.id = f"local:{source}"

    def complete(self, messages: list[dict], temperature: float = 0.0, seed: int | None = None) -> str:
        import torch

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        sample = temperature > 0
        if sample:
            torch.manual_seed(0 if seed is None else seed)
        with torch.no_grad():
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
