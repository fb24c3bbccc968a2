"""A real OpenAI-compatible chat-completions server on loopback, with injectable faults.

Tests and ``benchmarks/executor_throughput.py`` talk to it through the real ``openai`` client, so
retries, timeouts and body parsing are exercised for real (no mocks of our own code). It is a
small asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) so that hundreds of concurrent
slow requests cost no threads.

Faults, decided per request:

* **Directives in the last user message**, deterministic under any concurrency: ``#fail:429*2``
  answers the first 2 attempts *of that exact request body* with 429 and then succeeds;
  ``#fail:500*9`` fails 9 times (more than any retry budget); ``#hang*1`` never answers the first
  attempt; ``#malformed*1`` sends a 200 whose body is not JSON.
* **A random failure rate** (``fail_rate``, seeded) drawing from ``fail_kinds`` on every attempt,
  for throughput runs.

Replies echo the last user message unless ``responder(messages) -> str`` is set. Usage counts
words, so tests can predict token totals. Run standalone for the benchmark:
``python tests/openai_stub.py --latency 0.2 --fail-rate 0.1`` prints ``PORT <n>`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

DIRECTIVE = re.compile(r"#(fail:(\d{3})|hang|malformed)\*(\d+)")


@dataclass
class StubConfig:
    latency: float = 0.0
    """Seconds every request waits before answering (also before a failure)."""
    fail_rate: float = 0.0
    """Probability that an attempt fails with one of ``fail_kinds`` (seeded)."""
    fail_kinds: tuple[str, ...] = ("429", "500", "hang", "malformed")
    seed: int = 0
    hang_s: float = 3600.0
    """How long a hanging request sleeps; the client's timeout must fire first."""
    responder: Callable[[list[dict]], str] | None = None


@dataclass
class StubStats:
    requests: int = 0
    by_outcome: collections.Counter = field(default_factory=collections.Counter)
    attempts: collections.Counter = field(default_factory=collections.Counter)
    """Attempts per request-body hash (for the ``*N`` directives)."""
    in_flight: int = 0
    max_in_flight: int = 0


class OpenAIStub:
    """Start with ``with OpenAIStub(StubConfig(...)) as stub:``; ``stub.base_url`` ends in ``/v1``."""

    def __init__(self, config: StubConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or StubConfig()
        self.stats = StubStats()
        self.host, self.port = host, port
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> int:
        return self.stats.requests

    def reset_counts(self) -> None:
        """Zero the counters; per-body attempt counts survive, so ``*N`` directives span resets."""
        with self._lock:
            self.stats = StubStats(attempts=self.stats.attempts)

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> OpenAIStub:
        self._thread = threading.Thread(target=self._run_thread, daemon=True, name="openai-stub")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("openai stub did not start within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def _run_thread(self) -> None:
        asyncio.run(self.serve())

    async def serve(self, on_ready: Callable[[int], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle_connection, self.host, self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        if on_ready:
            on_ready(self.port)
        async with server:
            await self._stop.wait()

    # -- HTTP -----------------------------------------------------------------------------------
    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, extra, payload = await self._respond(method, path, body)
                if status is None:  # hang: keep the connection silent until the client gives up
                    await asyncio.sleep(self.config.hang_s)
                    return
                head_out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'X')}", f"Content-Length: {len(payload)}",
                            "Content-Type: application/json", "Connection: keep-alive", *extra]
                writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # client went away, or the stub is shutting down
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: bytes) -> tuple[int | None, list[str], bytes]:
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, [], b'{"error": {"message": "not found"}}'
        request = json.loads(body)
        messages = request.get("messages", [])
        key = hashlib.sha256(body).hexdigest()
        with self._lock:
            self.stats.requests += 1
            self.stats.attempts[key] += 1
            attempt = self.stats.attempts[key]
            outcome = self._decide(messages, attempt)
            self.stats.by_outcome[outcome] += 1
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            if self.config.latency:
                await asyncio.sleep(self.config.latency)
        finally:
            with self._lock:
                self.stats.in_flight -= 1
        if outcome == "hang":
            return None, [], b""
        if outcome in ("429", "500", "503"):
            err = json.dumps({"error": {"message": f"injected {outcome}", "type": "stub"}}).encode()
            return int(outcome), ["retry-after-ms: 10"], err
        if outcome == "malformed":
            return 200, [], b'{"id": "chatcmpl-broken", "choices": [ {"mess'
        return 200, [], self._completion(request, messages)

    def _decide(self, messages: list[dict], attempt: int) -> str:
        last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        for match in DIRECTIVE.finditer(str(last)):
            kind = match.group(2) or match.group(1)
            if attempt <= int(match.group(3)):
                return kind
        if self.config.fail_rate and self._rng.random() < self.config.fail_rate:
            return self._rng.choice(self.config.fail_kinds)
        return "ok"

    def _completion(self, request: dict, messages: list[dict]) -> bytes:
        last = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        text = self.config.responder(messages) if self.config.responder else f"echo: {last}"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        completion_tokens = len(text.split())
        return json.dumps({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": request.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }).encode()


_REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Unavailable"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-kinds", default="429,500,hang,malformed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stub = OpenAIStub(StubConfig(latency=args.latency, fail_rate=args.fail_rate,
                                 fail_kinds=tuple(args.fail_kinds.split(",")), seed=args.seed), port=args.port)
    asyncio.run(stub.serve(on_ready=lambda port: print(f"PORT {port}", flush=True)))


if __name__ == "__main__":
    main()


def operator_responder(messages: list[dict], *, solutions: dict[str, str] | None = None) -> str:
    """Canned executor replies for the workflow operators, in the tags and fences their prompts ask for.

    Recognises each operator by its prompt (``spogw/workflows/prompts/operators.yaml``). Code requests
    for function ``f`` return ``solutions[f]``; a first attempt that is wrong on purpose can be given as
    ``solutions["f:first"]`` (the Test operator's reflection then gets ``solutions[f]``). Directives
    (``#fail:...``) in a prompt still apply, as for any request.
    """
    solutions = solutions or {}
    prompt = str(messages[-1].get("content", ""))
    if "<solution_letter>" in prompt:
        return "<thought>B and C agree.</thought>\n<solution_letter>B</solution_letter>"
    if "<review_result>" in prompt:
        return "<review_result>false</review_result>\n<feedback>Recheck the final sum.</feedback>"
    if "reviewed as incorrect" in prompt:
        return "<solution>The revised answer is \\boxed{2}.</solution>"
    if "extract" in prompt and "<solution>" in prompt:
        return "<solution>2</solution>"
    if "function named `solve`" in prompt:
        return "Here is the code:\n```python\ndef solve():\n    return 1 + 1\n```"
    match = re.search(r"defines the function `(\w+)`|must define `(\w+)`", prompt)
    if match:
        name = match.group(1) or match.group(2)
        reflecting = match.group(2) is not None
        fallback = solutions.get(name, f"def {name}(*a):\n    return None")
        code = solutions.get(name if reflecting else f"{name}:first", fallback)
        return f"Let me think.\n```python\n{code}\n```"
    if "<answer>" in prompt:
        return "<thought>One plus one is two.</thought>\n<answer>2</answer>"
    return "Step by step: 1 + 1 = 2. The answer is \\boxed{2}."
