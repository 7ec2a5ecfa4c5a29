"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...), with
the standard library only.

Request: ``POST {base_url}/chat/completions`` with JSON ``{"model", "messages", "temperature", "max_tokens"
[, "seed"]}``; the answer is ``choices[0].message.content``. The API key is read at call time from the
environment variable NAMED by ``api_key_env`` (the key itself never enters configs or results).

Failure handling, per call:
- timeout, connection error, HTTP 5xx: retried up to ``max_retries`` times, waiting
  ``min(backoff * 2**k, max_backoff)`` seconds before retry k+1;
- HTTP 429: retried likewise, waiting the server's ``Retry-After`` seconds when it sends one (capped at
  ``max_backoff``);
- other HTTP 4xx: ``JudgeRequestError`` at once (no retry);
- HTTP 200 whose body is not JSON or lacks the fields: ``JudgeResponseError`` (the grading layer counts it
  as a failed try). So does running out of retries.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime

from .judges import JudgeRequestError, JudgeResponseError


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def content_of(body: bytes) -> str:
    """`choices[0].message.content` of a chat-completions response body; JudgeResponseError otherwise."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise JudgeResponseError(f"judge response is not JSON: {body[:120]!r}") from None
    try:
        content = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeResponseError(f"judge response lacks choices[0].message.content: {body[:200]!r}") from None
    if not isinstance(content, str):
        raise JudgeResponseError(f"judge response content is not text: {content!r:.120}")
    return content


class HTTPJudge:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_tokens: int = 256, send_seed: bool = True, sleep=time.sleep):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.max_tokens, self.send_seed, self.sleep = max_tokens, send_seed, sleep  # off: servers rejecting 'seed'
        self.id = f"http:{model}@{base_url.rstrip('/')}"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeRequestError(f"the judge's API key variable ${self.api_key_env} is not set (set it, or "
                                        f"configure no key variable for a local server that needs none)")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict], temperature: float = 0.0, seed: int | None = None) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": temperature,
                   "max_tokens": self.max_tokens}
        if seed is not None and self.send_seed:
            payload["seed"] = seed
        data = json.dumps(payload).encode()
        headers = self._headers()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.backoff * 2 ** attempt, self.max_backoff)
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                return content_of(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code == 429:
                    after = retry_after_seconds(e.headers.get("Retry-After"))
                    wait = min(after, self.max_backoff) if after is not None else wait
                    last = f"HTTP 429 (rate limited): {detail}"
                elif e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                else:
                    hint = f" — check ${self.api_key_env}" if e.code in (401, 403) and self.api_key_env else ""
                    raise JudgeRequestError(f"judge {self.url} refused the request: HTTP {e.code}{hint}: "
                                            f"{detail}") from None
            except (TimeoutError, socket.timeout) as e:
                last = f"timed out after {self.timeout}s ({e})"
            except urllib.error.URLError as e:
                last = f"cannot reach the judge: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                last = f"connection failed: {e!r}"
            if attempt < self.max_retries:
                self.sleep(wait)
        raise JudgeResponseError(f"judge {self.url}: no usable answer after {self.max_retries + 1} tries; last: {last}")

