"""The engine's generator backend: the run's vLLM OpenAI server (:mod:`spogw.engine`) writes the workflows.

Same prompts in, same records out as the in-process backends: the chat template is rendered here by the same
transformers tokenizer and sent as token ids to ``/v1/completions`` (so the server's own template rendering
plays no part), prompts keep their last ``min(max_prompt_tokens, max_model_len - max_new_tokens)`` tokens,
completions stop at EOS and come back without special tokens, ``n`` per prompt in index order.

* **Concurrency.** Every prompt of a call is a request of its own, all in flight at once (up to
  ``max_rows_in_flight`` rows), so the server batches across queries; ``on_prompt`` hands each prompt's
  completions over as soon as they arrive, which lets the sample stage write a query the moment it is done.
* **Adapters.** :meth:`ServerGenerator.set_adapter` loads a peft adapter at run time
  (``POST /v1/load_lora_adapter`` under a fresh name; the previous one is unloaded): the base model stays
  loaded, the server stays up, and the executor keeps using the base model meanwhile.
* **Guided sampling.** ``guide=<family>`` walks the family's grammar and asks the server only for the choices
  and instructions, each under a small structured-output regex, the forced text going in as prompt
  (``guided="segments"``, :mod:`spogw.generation.guided_server`; several times fewer decoding steps), or sends
  the whole grammar as one regex (``guided="regex"``, :meth:`spogw.workflows.guide.Guide.regex`, as the offline
  vLLM backend does). Both write text of the same language.
* **Seeds** are per prompt (``seed * 1_000_003 + i``, or a list), so a query draws the same samples whatever
  else is in flight (up to the engine's numerics).
* **Failures** name the cause: a server that died (:class:`spogw.engine.EngineUnavailable` with its log's
  tail), a refused request (HTTP status and message), or a reply that is not a completion.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from spogw.engine.server import SERVED_NAME, EngineUnavailable
from spogw.generation.base import GenerationStats, adapter_rank, check_sampling, prompt_seeds


class ServerGenerator:
    """Generates through ``engine`` (a ready :class:`spogw.engine.Engine`), optionally through a LoRA ``adapter``."""

    concurrent = True
    """All prompts of a call are in flight at once: callers hand it every query together."""

    def __init__(self, engine, adapter: str | None = None, *, max_prompt_tokens: int = 4096,
                 max_rows_in_flight: int = 256, timeout_s: float = 1800.0, retries: int = 2,
                 guided: str = "segments"):
        if guided not in ("segments", "regex"):
            raise ValueError(f"`guided` must be segments or regex, got {guided!r}")
        self.engine, self.guided = engine, guided
        self.model_name = engine.model_name
        self.max_prompt_tokens, self.max_rows_in_flight = max_prompt_tokens, max_rows_in_flight
        self.timeout_s, self.retries = timeout_s, retries
        self.stats = GenerationStats()
        self.adapter: str | None = None
        self._loaded: tuple[str, str] | None = None  # (server-side name, path) of the adapter loaded now
        self._loaded_on: int | None = None  # the server process it was loaded into
        self._count = 0
        self._tokenizer = None
        self.set_adapter(adapter)

    # -- adapters --------------------------------------------------------------------------------------

    def set_adapter(self, adapter: str | None) -> None:
        """Generate through ``adapter`` from the next call on (None: the base model); loaded on that call."""
        if adapter is not None:
            adapter = str(Path(adapter).resolve())
            rank = adapter_rank(adapter)
            if rank > self.engine.options.max_lora_rank:
                raise ValueError(f"the adapter {adapter} has LoRA rank {rank}, above `--engine.max_lora_rank "
                                 f"{self.engine.options.max_lora_rank}`: raise it to at least {rank}")
        self.adapter = adapter
        self.identity = self.engine.identity + (f"+{adapter}" if adapter else "")

    async def _sync_adapter(self, session) -> str:
        """The model name requests use: the base model's, or the adapter's once the server has loaded it."""
        if self.adapter is None:
            return SERVED_NAME
        if self._loaded_on != self.engine.pid:  # a restarted server has no adapter loaded
            self._loaded = None
        if self._loaded is not None and self._loaded[1] == self.adapter:
            return self._loaded[0]
        if self._loaded is not None:
            await self._post(session, "/unload_lora_adapter", {"lora_name": self._loaded[0]}, expect_json=False,
                             quiet=True)
        self._count += 1
        # the name is the adapter's own (path and weights' mtime): another generator of the same run (the next
        # iteration's, the evaluation's) loads into the same server, which refuses a name it already holds
        name = f"adapter-{_adapter_key(self.adapter)}"
        try:
            await self._post(session, "/load_lora_adapter", {"lora_name": name, "lora_path": self.adapter},
                             expect_json=False)
        except ValueError as exc:  # the server refused it
            if "already been loaded" not in str(exc):
                raise  # the same adapter, loaded by an earlier generator: use it
        self._loaded, self._loaded_on = (name, self.adapter), self.engine.pid
        return name

    # -- generation ------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[dict]], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 512, seed=0, guide: str | None = None, on_batch=None,
                 on_prompt=None) -> list[list[str]]:
        """``n`` completions per conversation, in prompt order (see :class:`spogw.generation.base.Generator`)."""
        check_sampling(n, temperature, top_p, max_new_tokens)
        max_len = self.engine.options.max_model_len
        if max_new_tokens >= max_len:
            raise ValueError(f"`max_new_tokens` ({max_new_tokens}) leaves no room for the prompt in "
                             f"`--engine.max_model_len {max_len}`")
        if not prompts:
            return []
        seeds = prompt_seeds(seed, len(prompts))
        room = min(self.max_prompt_tokens, max_len - max_new_tokens)
        ids = [self._prompt_ids(conversation, room) for conversation in prompts]
        extra = {}
        if guide is not None:
            from spogw.workflows.guide import load_guide

            if self.guided == "segments":
                return self._generate_walks(ids, seeds, load_guide(guide), n, temperature, top_p, max_new_tokens,
                                            on_batch, on_prompt)
            extra["structured_outputs"] = {"regex": load_guide(guide).regex()}
        bodies = [{"prompt": p, "n": n, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
                   "max_tokens": max_new_tokens, "seed": s, "skip_special_tokens": True, **extra}
                  for p, s in zip(ids, seeds, strict=True)]
        start = time.perf_counter()
        texts, generated = asyncio.run(self._run(bodies, n, on_batch, on_prompt))
        self.stats.record(prompt_tokens=sum(len(p) for p in ids), generated_tokens=generated,
                          seconds=time.perf_counter() - start, rows=len(prompts) * n)
        return texts

    async def _run(self, bodies: list[dict], n: int, on_batch, on_prompt) -> tuple[list[list[str]], int]:
        import aiohttp

        limit = asyncio.Semaphore(max(1, self.max_rows_in_flight // n))
        texts: list[list[str] | None] = [None] * len(bodies)
        counts = {"rows": 0, "tokens": 0}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            model = await self._sync_adapter(session)

            async def one(i: int, body: dict) -> None:
                async with limit:
                    data = await self._post(session, "/completions", {"model": model, **body})
                texts[i], tokens = _read(data, n)
                counts["rows"] += n
                counts["tokens"] += tokens
                if on_prompt is not None:
                    on_prompt(i, texts[i])
                if on_batch is not None:
                    on_batch(counts["rows"], len(bodies) * n)

            tasks = [asyncio.ensure_future(one(i, b)) for i, b in enumerate(bodies)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        return texts, counts["tokens"]  # type: ignore[return-value]

    def _generate_walks(self, ids, seeds, guide, n, temperature, top_p, max_new_tokens, on_batch,
                        on_prompt) -> list[list[str]]:
        start = time.perf_counter()
        texts = asyncio.run(self._run_walks(ids, seeds, guide, n, temperature, top_p, max_new_tokens, on_batch,
                                            on_prompt))
        generated = sum(len(self._encode(t)) for group in texts for t in group)
        self.stats.record(prompt_tokens=sum(len(p) for p in ids), generated_tokens=generated,
                          seconds=time.perf_counter() - start, rows=len(ids) * n)
        return texts

    async def _run_walks(self, ids, seeds, guide, n, temperature, top_p, max_new_tokens, on_batch, on_prompt):
        import aiohttp

        from spogw.generation.guided_server import GuidedWalk

        limit = asyncio.Semaphore(self.max_rows_in_flight)
        rows: list[list[str | None]] = [[None] * n for _ in ids]
        done = {"rows": 0}
        sampling = {"n": 1, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
                    "skip_special_tokens": True}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            model = await self._sync_adapter(session)

            async def walk_one(p: int, r: int) -> None:
                walk, k = GuidedWalk(guide, self._encode), 0
                async with limit:
                    while not walk.done:
                        prompt = ids[p] + walk.ids
                        if len(walk.ids) > max_new_tokens:
                            break  # too long: left unfinished (invalid), as the other backends do
                        regex, max_tokens = walk.request()
                        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **sampling,
                                "seed": (seeds[p] * 1_000_003 + r * 1009 + k) % 2**63,
                                "structured_outputs": {"regex": regex}, "return_token_ids": True}
                        data = await self._post(session, "/completions", body)
                        text, _ = _read(data, 1)
                        walk.take(text[0], _token_ids(data))
                        k += 1
                rows[p][r] = walk.result()
                done["rows"] += 1
                if on_batch is not None:
                    on_batch(done["rows"], len(ids) * n)
                if on_prompt is not None and all(t is not None for t in rows[p]):
                    on_prompt(p, rows[p])

            tasks = [asyncio.ensure_future(walk_one(p, r)) for p in range(len(ids)) for r in range(n)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        return rows

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    async def _post(self, session, path: str, body: dict, *, expect_json: bool = True, quiet: bool = False):
        """POST to the server; connection failures and 5xx are retried ``retries`` times unless the server died."""
        import aiohttp

        url = self.engine.url + path
        for attempt in range(self.retries + 1):
            try:
                async with session.post(url, json=body) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        if not expect_json:
                            return None
                        try:
                            return json.loads(raw)
                        except ValueError:
                            raise EngineUnavailable(f"the vLLM server answered garbage to {path}: "
                                                    f"{raw[:200]!r}") from None
                    if quiet:
                        return None
                    message = _error_message(raw)
                    if resp.status < 500:
                        raise ValueError(f"the vLLM server refused {path} (HTTP {resp.status}): {message}")
                    cause = f"HTTP {resp.status}: {message}"
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                cause = f"{type(exc).__name__}: {exc}"
            if not self.engine.alive():
                raise EngineUnavailable(self.engine.death_note())
            if attempt == self.retries:
                raise EngineUnavailable(f"the vLLM server failed {path} {self.retries + 1} times ({cause}); "
                                        f"log {self.engine.log_path}")
            await asyncio.sleep(1.0 * 2**attempt)

    def _prompt_ids(self, conversation: list[dict], room: int) -> list[int]:
        if self._tokenizer is None:
            from spogw.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name)
        tok = self._tokenizer
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"][-room:]


def _read(data, n: int) -> tuple[list[str], int]:
    """The ``n`` texts of a completions reply, in index order, and its completion tokens."""
    try:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        texts = [c["text"] for c in choices]
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise EngineUnavailable(f"the vLLM server answered garbage (not a completion: {type(exc).__name__} "
                                f"{exc}): {str(data)[:200]}") from None
    if len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise EngineUnavailable(f"the vLLM server answered garbage: {len(texts)} completions, expected {n}")
    return texts, tokens


def _adapter_key(path: str) -> str:
    """A short digest of an adapter directory's path and its files' sizes and mtimes (a retrained one differs)."""
    import hashlib

    h = hashlib.sha256(path.encode())
    for f in sorted(Path(path).glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _token_ids(data) -> list[int] | None:
    """The sampled token ids of a one-completion reply (``return_token_ids``), or None when the server sent none."""
    try:
        ids = data["choices"][0].get("token_ids")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return [int(t) for t in ids] if isinstance(ids, list) and all(isinstance(t, int) for t in ids) else None


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        error = data.get("error", data)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
    except ValueError:
        return raw.decode("utf-8", "replace")[:300]
