"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...), with
the standard library only.

Request: ``POST {base_url}/chat/completions`` with JSON ``{"model", "messages", "temperature", "max_tokens"
[, "seed"]}``; the answer is ``choices[0].message.content``. The API key is read at call time from the
environment variable NAMED by ``api_key_env`` (the key itself never enters configs or results).

Limits, per request (each try): ``timeout`` seconds of silence on the socket, ``deadline`` seconds in all
(connect, headers and body; a watchdog cuts the connection when it passes, so a server dripping bytes cannot
hold a try longer; DNS lookup is the one step it cannot interrupt), and a body of at most
``max_response_bytes`` (refused from its Content-Length, or as soon as more arrives, the rest unread).

Failure handling, per call:
- timeout, deadline passed, connection error, HTTP 5xx: retried up to ``max_retries`` times, waiting
  ``min(backoff * 2**k, max_backoff)`` seconds before retry k+1;
- HTTP 429: retried likewise, waiting the server's ``Retry-After`` seconds when it sends one (capped at
  ``max_backoff``);
- other HTTP 4xx: ``JudgeRequestError`` at once (no retry);
- HTTP 200 whose body is over ``max_response_bytes``, not JSON or lacks the fields: ``JudgeResponseError`` at
  once (no retry of the same request; the grading layer counts it as a failed try). So does running out of
  retries.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime

from .judges import JudgeRequestError, JudgeResponseError

DEADLINE = 120.0  # s per request, everything included
MAX_RESPONSE_BYTES = 4_000_000  # a chat completion of a few hundred tokens is a few kB
CHUNK = 65536


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


class Watchdog:
    """One request's deadline: when it passes, the sockets the request opened are shut down, which wakes a read
    blocked on them (it then returns no data or fails); `expired` tells that apart from a server's own end."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.expired = False
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True
        self.timer.start()

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.left() <= 0

    def opened(self, sock: socket.socket) -> None:
        with self.lock:
            self.socks.append(sock)
            late = self.expired
        if late:
            _shut(sock)

    def cut(self) -> None:
        with self.lock:
            self.expired = True
            socks = list(self.socks)
        for sock in socks:
            _shut(sock)

    def cancel(self) -> None:
        self.timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def watched_opener(watch: Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment included) whose HTTP(S) connections report their TCP
    socket to `watch` as soon as it exists, before any TLS handshake."""
    def watched(conn_class):
        def make(*args, **kwargs):
            conn = conn_class(*args, **kwargs)

            def create_connection(*a, **kw):
                sock = socket.create_connection(*a, **kw)
                watch.opened(sock)
                return sock
            conn._create_connection = create_connection  # http.client's hook for opening the socket
            return conn
        return make

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def error_detail(e: urllib.error.HTTPError) -> str:
    """The start of an error response's body (read under the deadline, never whole)."""
    try:
        return e.read(300).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as err:
        return f"(body unreadable: {err!r})"


def _positive_seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class HTTPJudge:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_tokens: int = 256, send_seed: bool = True, sleep=time.sleep, deadline: float = DEADLINE,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be a positive whole number, got {max_response_bytes!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.deadline = _positive_seconds("timeout", timeout), _positive_seconds("deadline", deadline)
        self.max_response_bytes = max_response_bytes
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
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

    def _too_large(self, what: str) -> JudgeResponseError:
        return JudgeResponseError(f"judge {self.url}: response refused, {what} exceeds the cap of "
                                  f"{self.max_response_bytes} bytes (max_response_bytes)")

    def _read_capped(self, resp) -> bytes:
        """The body, refused (unread) when its declared length is over the cap, or once more than the cap arrives."""
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_response_bytes:
            raise self._too_large(f"its Content-Length {int(declared)}")
        chunks, total = [], 0
        while chunk := resp.read(min(CHUNK, self.max_response_bytes + 1 - total)):
            total += len(chunk)
            if total > self.max_response_bytes:
                raise self._too_large("its body")
            chunks.append(chunk)
        return b"".join(chunks)

    def _fetch(self, req, watch: Watchdog) -> bytes:
        """One request's body within the deadline and the cap; TimeoutError when the deadline cut it short."""
        timeout = max(min(self.timeout, watch.left()), 0.001)  # the socket never waits past the deadline
        with watched_opener(watch).open(req, timeout=timeout) as resp:
            body = self._read_capped(resp)
        if watch.expired:  # the cut ends a read like the server's own end of the body: not a whole answer
            raise TimeoutError("deadline passed")
        return body

    def _transport_failure(self, e: Exception, watch: Watchdog) -> str:
        if watch.passed():
            return f"timed out: no complete answer within the {self.deadline:g}s deadline"
        if isinstance(e, TimeoutError):
            return f"timed out after {self.timeout:g}s ({e})"
        if isinstance(e, urllib.error.URLError):
            return f"cannot reach the judge: {e.reason}"
        return f"connection failed: {e!r}"

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
            watch = Watchdog(self.deadline)
            try:
                return content_of(self._fetch(req, watch))
            except urllib.error.HTTPError as e:
                detail = error_detail(e)
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
            except (OSError, http.client.HTTPException) as e:  # timeouts, URLError, connection errors
                last = self._transport_failure(e, watch)
            finally:
                watch.cancel()
            if attempt < self.max_retries:
                self.sleep(wait)
        raise JudgeResponseError(f"judge {self.url}: no usable answer after {self.max_retries + 1} tries; last: {last}")
