"""``SandboxPool``: warm zygotes, one forked sandbox per program, check or entry (``spogw.runtime.sandbox`` holds
the limits, the results and the parent's handle on a zygote; ``sandbox_rpc`` the entries' RPC)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
from collections.abc import Iterable

from spogw.runtime.sandbox import (
    SandboxLimits,
    SandboxResult,
    _check_task,
    _failure,
    _task,
    _Zygote,
    entry_paths,
    zygote_options,
)
from spogw.runtime.sandbox_rpc import entry_task


class _Item:
    """A queued task; ``cancel()`` before it starts skips it, after it starts kills its children."""

    def __init__(self, task: dict, fds: list[int]):
        self.task, self.fds = task, fds
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.zygote: _Zygote | None = None
        self.cancelled = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            zygote = self.zygote
        if zygote is not None:
            zygote.cancel()

    def pause(self, paused: bool) -> None:
        with self.lock:
            zygote = self.zygote
        if zygote is not None:
            zygote.pause(paused, self.task.get("tid"))


class SandboxPool:
    """Warm zygotes (one per worker) that fork one fully isolated sandbox per program, check or entry.

    Thread-safe; ``map`` keeps order; ``arun``/``acheck``/``arun_entry`` are for asyncio callers. A zygote that
    dies is replaced and its task reported as ``sandbox_error``; a program can neither signal nor see its zygote
    (other uid, own pid namespace). ``expose``/``site_packages``/``hide_paths``: what children see (see
    ``run_program``); ``preload``: modules the zygotes import before forking (an entry's module, say);
    ``lazy``: start each worker's zygote on its first task instead of at once."""

    def __init__(self, workers: int | None = None, limits: SandboxLimits | None = None,
                 hide_paths: Iterable[str] | None = None, *, expose: Iterable[str] = (), site_packages: bool = False,
                 preload: Iterable[str] = (), lazy: bool = False):
        self.workers = workers or os.cpu_count() or 1
        self.limits = limits or SandboxLimits()
        self.options = zygote_options(hide_paths, expose, site_packages, preload)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lazy = lazy
        self._started = threading.Barrier(self.workers + 1)
        self._errors: list[str] = []
        self._threads = [threading.Thread(target=self._worker, name=f"sandbox-pool-{i}", daemon=True)
                         for i in range(self.workers)]
        self.protections: dict[str, str] = {}
        self._zygotes: dict[int, _Zygote] = {}
        for t in self._threads:
            t.start()
        self._started.wait()
        if self._errors:
            self.close()
            raise RuntimeError(f"SandboxPool: {self._errors[0]}")

    def _start_zygote(self) -> _Zygote:
        try:
            z = _Zygote(options=self.options)
        except RuntimeError:  # once more before the worker's task fails for an infrastructure reason
            z = _Zygote(options=self.options)
        self._zygotes[threading.get_ident()] = z
        self.protections = z.protections
        return z

    def _worker(self) -> None:
        """Owns one zygote for its whole life (the zygote's parent-death signal is tied to this thread)."""
        zygote = None
        if not self._lazy:
            try:
                zygote = self._start_zygote()
            except RuntimeError as e:
                self._errors.append(str(e))
        self._started.wait()
        while True:
            item = self._queue.get()
            if item is None:
                break
            with item.lock:
                skip = item.cancelled or not item.future.set_running_or_notify_cancel()
            if skip:
                for fd in item.fds:
                    os.close(fd)
                if not item.future.done():
                    item.future.set_result(_failure("killed", "cancelled before it started"))
                continue
            try:
                if zygote is None or not zygote.alive:
                    zygote = self._start_zygote()
                with item.lock:
                    item.zygote = zygote
                res = zygote.run(item.task, item.fds)
            except BaseException as e:  # noqa: B036 - a pool worker must survive anything
                for fd in item.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                res = _failure("sandbox_error", f"sandbox pool worker: {e!r}")
            item.future.set_result(res)
        if zygote is not None:
            zygote.close()

    @property
    def uids(self) -> set[int]:
        """The uids the pool's sandboxes run as now (two per worker; a replaced zygote gets new ones)."""
        return {uid for z in self._zygotes.values() for uid in z.uids}

    def _submit(self, task: dict, fds: list[int] = ()) -> _Item:
        if self._closed:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("SandboxPool is closed")
        item = _Item(task, list(fds))
        self._queue.put(item)
        return item

    def submit(self, code: str, *, limits: SandboxLimits | None = None, stdin: str | None = None,
               files: dict[str, str] | None = None) -> concurrent.futures.Future:
        return self._submit(_task(code, limits or self.limits, stdin, files)).future

    def run(self, code: str, **kw) -> SandboxResult:
        return self.submit(code, **kw).result()

    def map(self, codes: Iterable[str], **kw) -> list[SandboxResult]:
        """Run every program (``workers`` at a time); results in input order."""
        return [f.result() for f in [self.submit(c, **kw) for c in codes]]

    async def arun(self, code: str, **kw) -> SandboxResult:
        return await asyncio.wrap_future(self.submit(code, **kw))

    def submit_check(self, check: dict, *, limits: SandboxLimits | None = None) -> concurrent.futures.Future:
        """A check: the solution and its tests in two sandboxed processes (``spogw/runtime/zygote/check.py``)."""
        return self._submit(_check_task(check, limits or self.limits)).future

    def check(self, check: dict, **kw) -> SandboxResult:
        return self.submit_check(check, **kw).result()

    def map_checks(self, checks: Iterable[dict], **kw) -> list[SandboxResult]:
        return [f.result() for f in [self.submit_check(c, **kw) for c in checks]]

    async def acheck(self, check: dict, **kw) -> SandboxResult:
        return await asyncio.wrap_future(self.submit_check(check, **kw))

    async def arun_entry(self, entry: str, payload: dict, **kw) -> SandboxResult:
        """``run_entry`` in a warm zygote of this pool (make the pool with ``SandboxPool.for_entry``)."""

        def start(task: dict, fds: list[int]):
            item = self._submit(task, fds)
            return item.future, item.cancel, item.pause

        return await entry_task(start, entry, payload, **kw, default_limits=self.limits)

    @classmethod
    def for_entry(cls, entry: str, workers: int, limits: SandboxLimits | None = None, **kw) -> SandboxPool:
        """A pool whose children can import ``entry`` (its package bound in, its module preloaded), started lazily."""
        module = entry.rpartition(":")[0]
        preload = () if module.endswith(".py") else (module,)
        return cls(workers, limits, expose=entry_paths(entry), preload=preload, lazy=True, **kw)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
