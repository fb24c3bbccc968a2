"""A persistent response cache shared by every executor backend, so a rerun pays no call twice.

Storage is one sqlite3 file in WAL mode: readers never block the writer, and several processes
(DDP ranks, a resumed stage next to a running one) can write at once; sqlite's own locking
serialises the commits and ``busy_timeout`` waits them out instead of failing. Writes are
``INSERT OR IGNORE``: two writers of the same key wrote the same reply (temperature 0) or equally
valid samples, and the first one wins for everyone from then on.

The key is the sha256 of canonical JSON (sorted keys, no whitespace) of the executor's identity,
the messages, the sampling parameters, the run index and the repeat index. Failed calls are never
stored, so a rerun retries exactly the calls that failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from spogw.runtime.executor import ChatResult, Executor

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(identity: str, messages: list[dict], *, temperature: float, max_tokens: int, run_index: int,
              repeat: int = 0, **sampling) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    payload = {"identity": identity, "messages": messages, "temperature": float(temperature),
               "max_tokens": int(max_tokens), "run_index": int(run_index), "repeat": int(repeat),
               "sampling": sampling}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()  # lone surrogates hash too


class ResponseCache:
    """The sqlite store. Thread-safe within a process, process-safe through sqlite's WAL locking."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False,
                                     isolation_level=None)
        # WAL: concurrent readers + one writer at a time across processes; NORMAL sync is durable
        # at every checkpoint and never corrupts the file, which is all a cache needs.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        with self._lock:
            self._conn.execute(SCHEMA)

    def get(self, key: str) -> ChatResult | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens, cost_usd FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        return ChatResult(row[0], row[1], row[2], row[3], 0.0, cached=True)

    def put(self, key: str, identity: str, result: ChatResult) -> None:
        if result.error is not None:
            return
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                # sqlite stores valid UTF-8 only: a reply with lone surrogates is kept with replacement characters
                (key, identity, result.text.encode("utf-8", "replace").decode("utf-8"), result.prompt_tokens,
                 result.completion_tokens, result.cost_usd, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class CachedExecutor:
    """Any :class:`Executor` with the persistent cache in front of it.

    Identical requests already in flight are joined rather than sent again: a generator often writes
    the same workflow twice for one query, and both copies would otherwise pay for every call on a cold
    cache. A joined reply is marked ``cached`` (it was paid once). ``hits`` counts replies from disk or
    joined, ``misses`` calls sent to the backend (a warm rerun shows ``misses == 0``).
    """

    def __init__(self, executor: Executor, path: str | Path):
        self.executor = executor
        self.identity = executor.identity
        self.cache = ResponseCache(path)
        self.hits = self.misses = 0
        self._inflight: dict[tuple[int, str], asyncio.Future] = {}

    async def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
                   run_index: int = 0, repeat: int = 0) -> ChatResult:
        key = cache_key(self.identity, messages, temperature=temperature, max_tokens=max_tokens,
                        run_index=run_index, repeat=repeat)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        slot = (id(asyncio.get_running_loop()), key)
        while (pending := self._inflight.get(slot)) is not None:
            joined = await asyncio.shield(pending)
            if joined is not None:
                self.hits += 1
                return dataclasses.replace(joined, cached=True, latency_s=0.0)
            # the caller that sent it was cancelled (its workflow timed out): ask again, ourselves
        future = asyncio.get_running_loop().create_future()
        self._inflight[slot] = future
        self.misses += 1
        try:
            result = await self.executor.chat(messages, temperature=temperature, max_tokens=max_tokens,
                                              run_index=run_index, repeat=repeat)
        except asyncio.CancelledError:  # our caller gave up; that is no failure of the request for the others
            future.set_result(None)
            raise
        except BaseException as exc:  # the backend raised (it should not); joiners get a recorded failure
            future.set_result(ChatResult("", error=f"{type(exc).__name__}: {exc}"))
            raise
        else:
            self.cache.put(key, self.identity, result)
            future.set_result(result)
        finally:
            del self._inflight[slot]
        return result

    def __getattr__(self, name: str):  # backend extras (generate_calls, aclose) stay reachable
        if name == "executor":
            raise AttributeError(name)
        return getattr(self.executor, name)
