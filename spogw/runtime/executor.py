"""Executor backends: the LLM that runs workflows, behind one small async interface (DESIGN §4).

* :class:`OpenAIExecutor` — any OpenAI-compatible endpoint (OpenAI, the run's vLLM server from
  :mod:`spogw.engine`, ...) through
  ``openai.AsyncOpenAI``. Retries on 408/409/429/5xx, connection errors and timeouts, with
  exponential backoff and ``Retry-After``, are the client's own (``max_retries``, ``timeout``);
  what we add is a concurrency bound, cost accounting, and a *recorded* final failure: ``chat``
  never raises for a remote fault, it returns a :class:`ChatResult` whose ``error`` names the cause.
* :class:`LocalExecutor` — a transformers model in-process (the embedded default). Concurrent
  requests wait a few ms in a queue and run as one left-padded batched ``generate`` in a worker
  thread, because a 135M model on 2 CPU cores is ~5x faster per token in batches of 8.

Both are wrapped by :class:`spogw.runtime.cache.CachedExecutor` for the persistent response cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class ChatResult:
    """One executor reply. ``error`` is set (and ``text`` empty) when the call failed for good."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Usage:
    """Executor usage summed over calls: one per workflow run, and summed again per stage.

    Cached replies cost nothing now; what they cost when first paid is kept in ``cached_cost_usd``
    so a resumed stage can still report the full price of its data.
    """

    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_cost_usd: float = 0.0
    latency_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, result: ChatResult) -> None:
        self.calls += 1
        self.latency_s += result.latency_s
        if result.error is not None:
            self.failed_calls += 1
            self.errors.append(result.error)
            return
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        if result.cached:
            self.cached_calls += 1
            self.cached_cost_usd += result.cost_usd
        else:
            self.cost_usd += result.cost_usd

    def merge(self, other: Usage) -> Usage:
        for name in ("calls", "cached_calls", "failed_calls", "prompt_tokens", "completion_tokens", "cost_usd",
                     "cached_cost_usd", "latency_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Executor(Protocol):
    """What operators need from an LLM. ``identity`` names the model for the response cache.

    ``run_index`` is the r-th independent run of a workflow on a problem (paper: r = 3) and
    ``repeat`` the n-th identical request within one run (a workflow that asks the same prompt
    three times for an ensemble); both only matter to the cache key, so that distinct samples stay
    distinct even when cached.
    """

    identity: str

    async def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
                   run_index: int = 0, repeat: int = 0) -> ChatResult: ...


def describe_error(exc: BaseException) -> str:
    """A one-line cause for a failed call: class, HTTP status when there is one, message, and the root cause.

    The root of the exception chain is added because client libraries re-label faults on the way up
    (openai's aiohttp transport reports a refused connection as a connect *timeout*)."""
    def one(e: BaseException) -> str:
        status = getattr(e, "status_code", None)
        message = str(e).splitlines()[0][:300] if str(e) else ""
        return f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + (f": {message}" if message else "")

    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    return one(exc) + (f" [cause: {one(root)}]" if root is not exc else "")


class OpenAIExecutor:
    """An OpenAI-compatible chat endpoint.

    The key is read from the environment variable ``api_key_env`` (a local ``vllm serve`` accepts
    any key, so a missing variable falls back to ``"EMPTY"`` there, but not for api.openai.com).
    Prices are USD per 1M tokens (gpt-4o-mini: 0.15 in, 0.60 out).

    ``transport="openai"`` (default) sends through ``openai.AsyncOpenAI`` and its retry machinery;
    ``http_backend`` picks its HTTP layer (``auto``: aiohttp when installed, which costs less CPU per
    call than httpx at high concurrency). ``transport="lean"`` speaks the same protocol over bare
    aiohttp with the same retry policy (:class:`_LeanClient`): ~4x less CPU per call, which matters
    when one event loop keeps 64+ calls in flight on a small CPU (benchmarks/executor_throughput.py).
    ``identity`` (default ``openai:<model>``) keys the response cache: the engine passes model and dtype.
    """

    def __init__(self, base_url: str | None = None, model: str = "gpt-4o-mini", *,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 64, timeout_s: float = 60.0,
                 max_retries: int = 4, price_in_per_m: float = 0.0, price_out_per_m: float = 0.0,
                 extra_body: dict | None = None, transport: str = "openai", http_backend: str = "auto",
                 identity: str | None = None):
        if concurrency < 1:
            raise ValueError(f"`concurrency` must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"`max_retries` must be >= 0, got {max_retries}")
        self.base_url, self.model = base_url, model
        self.api_key_env = api_key_env
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.price_in_per_m, self.price_out_per_m = price_in_per_m, price_out_per_m
        self.extra_body = extra_body or {}
        if transport not in ("openai", "lean"):
            raise ValueError(f"`transport` must be openai or lean, got {transport!r}")
        if http_backend not in ("auto", "aiohttp", "httpx"):
            raise ValueError(f"`http_backend` must be auto, aiohttp or httpx, got {http_backend!r}")
        self.transport, self.http_backend = transport, http_backend
        self.identity = identity or f"openai:{model}"
        self._per_loop: dict[int, tuple[Any, asyncio.Semaphore, asyncio.AbstractEventLoop]] = {}

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url is None or "api.openai.com" in self.base_url:
            raise RuntimeError(f"the executor needs an API key in ${self.api_key_env} (flag --executor.api_key_env)")
        return "EMPTY"

    def _client(self) -> tuple[Any, asyncio.Semaphore]:
        # An httpx client and a semaphore belong to one event loop; tests and resumed stages may
        # run several loops in turn, so each loop gets its own pair.
        loop = asyncio.get_running_loop()
        pair = self._per_loop.get(id(loop))
        if pair is None or pair[2] is not loop:
            if self.transport == "lean":
                client = _LeanClient(self.base_url or "https://api.openai.com/v1", self._api_key(), self.timeout_s,
                                     self.max_retries)
            else:
                from openai import AsyncOpenAI

                client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key(), timeout=self.timeout_s,
                                     max_retries=self.max_retries, http_client=self._http_client())
            pair = (client, asyncio.Semaphore(self.concurrency), loop)
            self._per_loop[id(loop)] = pair
        return pair[0], pair[1]

    def _http_client(self):
        # openai's default httpx2 pool scans every pooled connection on each request; with 64 in flight its
        # aiohttp backend costs about half the CPU per call (measured 1.7 -> 1.0 ms; then 0.6 ms with the raw
        # post below; benchmarks/executor_throughput.py).
        if self.http_backend == "httpx":
            return None
        try:
            import aiohttp  # noqa: F401
            from openai import DefaultAioHttpClient
        except ImportError:
            if self.http_backend == "aiohttp":
                raise RuntimeError("`--executor.http_backend aiohttp` needs the package aiohttp "
                                   "(pip install 'openai[aiohttp]')") from None
            return None
        return DefaultAioHttpClient(timeout=self.timeout_s)

    async def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
                   run_index: int = 0, repeat: int = 0) -> ChatResult:
        client, limit = self._client()
        async with limit:
            start = time.perf_counter()
            try:
                # The low-level ``post`` keeps the client's retries, backoff, Retry-After, timeout and auth, and
                # skips its typed request transform and pydantic response model (~0.4 ms of CPU per call, a
                # third of the client's cost at c = 64). We need three fields of the reply.
                body = {"model": self.model, "messages": messages, "temperature": temperature,
                        "max_tokens": max_tokens, **self.extra_body}
                data = await client.post("/chat/completions", body=body, cast_to=object)
                text, pin, pout = _read_completion(data)
            except Exception as exc:  # every remote fault becomes a recorded failure, never an escape
                cause = describe_error(exc)
                if isinstance(exc, ValueError) and not isinstance(exc, MalformedReply):  # JSONDecodeError & co
                    cause = f"malformed reply body: {cause}"
                if self.max_retries and _retryable(exc):
                    cause += f" (after {self.max_retries} retries)"
                return ChatResult("", latency_s=time.perf_counter() - start, error=cause)
            cost = (pin * self.price_in_per_m + pout * self.price_out_per_m) / 1e6
            return ChatResult(text, pin, pout, cost, time.perf_counter() - start)

    async def aclose(self) -> None:
        """Close this event loop's client (clients of loops already gone are dropped)."""
        loop = asyncio.get_running_loop()
        for key, (client, _, owner) in list(self._per_loop.items()):
            if owner is loop:
                await client.close()
            del self._per_loop[key]


class MalformedReply(ValueError):
    """A 200 reply that is not a chat completion."""


def _read_completion(data: object) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of a chat-completions JSON body."""
    try:
        choice = data["choices"][0]  # type: ignore[index]
        text = choice["message"]["content"]
        usage = data.get("usage") or {}  # type: ignore[union-attr]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise MalformedReply(f"reply is not a chat completion ({detail}): {str(data)[:200]}") from None
    if not isinstance(text, str):
        raise MalformedReply(f"reply has no text content (finish_reason={choice.get('finish_reason')!r})")
    return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def _retryable(exc: BaseException) -> bool:
    """The faults both transports retry: 408/409/429/5xx, connection errors and timeouts (openai-python's policy)."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return _retryable_status(status)
    if isinstance(exc, asyncio.TimeoutError | ConnectionError):
        return True
    try:
        import aiohttp
        import openai
    except ImportError:  # pragma: no cover - both come with the runtime extra
        return False
    return isinstance(exc, openai.APIConnectionError | aiohttp.ClientConnectionError)


class RequestTimeout(TimeoutError):
    """The per-call timeout fired (lean transport)."""


class HTTPStatusError(RuntimeError):
    """A non-200 reply (lean transport); ``status_code`` as on openai's errors."""

    def __init__(self, status_code: int, body: bytes):
        super().__init__(body.decode("utf-8", "replace")[:300])
        self.status_code = status_code


class _LeanClient:
    """OpenAI chat completions over bare aiohttp, with openai-python's retry policy.

    Retries 408/409/429/5xx, connection errors and timeouts up to ``max_retries`` times, waiting what
    the server asks (``retry-after-ms`` / ``Retry-After``, up to 60 s) or 0.5 s * 2^n (at most 8 s) less
    up to 25 % jitter. A 200 whose body is not JSON is not retried (it is a server bug, not load).
    """

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_retries: int):
        import aiohttp

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_retries = max_retries
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             headers={"Authorization": f"Bearer {api_key}"})

    async def post(self, path: str, *, body: dict, cast_to: type = object) -> dict:
        import aiohttp

        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                async with self.session.post(self.url, json=body, timeout=self.timeout) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        return json.loads(raw)
                    error: BaseException = HTTPStatusError(resp.status, raw)
                    if not _retryable_status(resp.status):
                        raise error
                    wait = _retry_after(resp.headers)
            except asyncio.TimeoutError:
                error = RequestTimeout(f"no complete reply within {self.timeout.total:g} s")
            except aiohttp.ClientConnectionError as exc:
                error = exc
            if attempt == self.max_retries:
                raise error
            if wait is None:
                wait = min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.session.close()


def _retry_after(headers) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if 0 < value <= 60:
            return value
    return None


@dataclass
class _Request:
    messages: list[dict]
    temperature: float
    max_tokens: int
    future: asyncio.Future


class LocalExecutor:
    """A transformers causal LM in this process; concurrent requests are batched.

    Requests queue up; a collector waits ``gather_ms`` after the first one for others with the
    same sampling parameters (up to ``max_batch``), then runs one ``generate`` over the batch in a
    worker thread so the event loop stays responsive. Temperature 0 is greedy, so a batched reply
    equals the unbatched one. ``generate_calls`` counts batches (tests check the batching).
    """

    def __init__(self, model: str = "embedded", *, max_batch: int = 8, gather_ms: float = 5.0,
                 dtype: str | None = "float32", max_input_tokens: int = 2048, seed: int = 0):
        if max_batch < 1:
            raise ValueError(f"`max_batch` must be >= 1, got {max_batch}")
        self.model_name, self.max_batch, self.gather_s = model, max_batch, gather_ms / 1000
        self.dtype, self.max_input_tokens, self.seed = dtype, max_input_tokens, seed
        self.identity = f"local:{model}"
        self.generate_calls = 0
        self.batch_sizes: list[int] = []
        self._model = self._tokenizer = None
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._queues: dict[int, tuple[asyncio.Queue, asyncio.Task, asyncio.AbstractEventLoop]] = {}

    def _load(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            from spogw.models import load_causal_lm, load_tokenizer

            tokenizer = load_tokenizer(self.model_name)
            tokenizer.padding_side = "left"  # generation continues from the right edge of every row
            tokenizer.truncation_side = "left"  # an over-long prompt loses its oldest text, not the turn to answer
            model = load_causal_lm(self.model_name, dtype=self.dtype)
            model.eval()
            self._tokenizer, self._model = tokenizer, model

    def _queue(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        entry = self._queues.get(id(loop))
        if entry is None or entry[2] is not loop or entry[1].done():
            queue: asyncio.Queue = asyncio.Queue()
            task = loop.create_task(self._collector(queue))
            entry = (queue, task, loop)
            self._queues[id(loop)] = entry
        return entry[0]

    async def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
                   run_index: int = 0, repeat: int = 0) -> ChatResult:
        start = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        await self._queue().put(_Request(messages, temperature, max_tokens, future))
        try:
            text, pin, pout = await future
        except Exception as exc:  # a model error fails this batch's calls, recorded, not raised
            return ChatResult("", latency_s=time.perf_counter() - start, error=describe_error(exc))
        return ChatResult(text, pin, pout, 0.0, time.perf_counter() - start)

    async def aclose(self) -> None:
        """Stop this loop's batch collector (the model stays loaded for the next loop)."""
        entry = self._queues.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            entry[1].cancel()

    async def _collector(self, queue: asyncio.Queue) -> None:
        pending: list[_Request] = []
        while True:
            if not pending:
                pending.append(await queue.get())
            deadline = asyncio.get_running_loop().time() + self.gather_s
            key = (pending[0].temperature, pending[0].max_tokens)
            batch, rest = [], []
            for req in pending:
                fits = (req.temperature, req.max_tokens) == key and len(batch) < self.max_batch
                (batch if fits else rest).append(req)
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    req = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                (batch if (req.temperature, req.max_tokens) == key else rest).append(req)
            pending = rest
            try:
                outputs = await asyncio.to_thread(self._generate, [r.messages for r in batch], *key)
            except Exception as exc:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            for req, out in zip(batch, outputs, strict=True):
                if not req.future.done():
                    req.future.set_result(out)

    def _generate(self, conversations: list[list[dict]], temperature: float,
                  max_tokens: int) -> list[tuple[str, int, int]]:
        import torch

        self._load()
        tok, model = self._tokenizer, self._model
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_input_tokens,
                  add_special_tokens=False)
        sampling = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature}
        with self._generate_lock, torch.inference_mode():
            if temperature > 0:
                torch.manual_seed(self.seed + self.generate_calls)
            out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, top_p=None,
                                 top_k=None, **sampling)
            self.generate_calls += 1
            self.batch_sizes.append(len(prompts))
        results = []
        width = enc["input_ids"].shape[1]
        for row, mask in zip(out, enc["attention_mask"], strict=True):
            new = row[width:]
            stop = (new == tok.eos_token_id).nonzero()
            new = new[: int(stop[0]) if len(stop) else len(new)]
            new = new[new != tok.pad_token_id] if tok.pad_token_id != tok.eos_token_id else new
            results.append((tok.decode(new, skip_special_tokens=True), int(mask.sum()), len(new)))
        return results
