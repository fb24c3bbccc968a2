"""The parent's side of ``run_entry``'s RPC: requests from a sandboxed child answered by an async handler.

The child's requests arrive on a pipe of their own (JSON frames: 4-byte length + JSON ``{"id", "request"}``) and
each is answered in its own task by ``await handler(request)``, at most ``max_in_flight`` at a time (beyond that
the parent stops reading: back-pressure). A frame over ``max_message_bytes``, a garbage frame or more than
``max_requests`` requests is a protocol violation: the child is cancelled (the zygote kills it and still reports
its output) and the result's status becomes ``protocol``. ``run_entry`` (below) and ``SandboxPool.arun_entry`` both
go through ``entry_task``; they differ only in which zygote runs the child.

While at least one request is being answered, ``on_pause(True)`` has stopped the child's wall clock (the zygote's
deadline, and this session's own wait for the result, move on by that time, up to the entry's ``max_wait_s``);
``on_pause(False)`` restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, replace
from typing import Any

from spogw.runtime.sandbox import SandboxLimits, SandboxResult, _failure, _once, _Zygote, entry_paths, zygote_options

_TASK_IDS = itertools.count(1)  # entry tasks' ids, for their pause/resume frames


class WaitClock:
    """How long at least one of a child's requests was being answered: the time its own clock stands still.

    ``begin``/``end`` bracket each request; ``on_pause(True)`` fires when the first one starts and
    ``on_pause(False)`` when the last one ends."""

    def __init__(self, on_pause: Callable[[bool], None] | None = None):
        self.on_pause = on_pause
        self.answering = 0
        self.paused_at: float | None = None
        self.stood = 0.0

    def stood_s(self) -> float:
        """Seconds stood still so far, the running pause included."""
        return self.stood + (time.monotonic() - self.paused_at if self.paused_at is not None else 0.0)

    def begin(self) -> None:
        self.answering += 1
        if self.answering == 1:
            self.paused_at = time.monotonic()
            if self.on_pause is not None:
                self.on_pause(True)

    def end(self) -> None:
        self.answering -= 1
        if self.answering == 0 and self.paused_at is not None:
            self.stood += time.monotonic() - self.paused_at
            self.paused_at = None
            if self.on_pause is not None:
                self.on_pause(False)


class RpcSession:
    """Serve one child's requests until its result (a future from the zygote's worker) is in."""

    def __init__(self, c2p_r: int, p2c_w: int, handler: Callable[[dict], Awaitable[Any]] | None, cap: int,
                 max_requests: int, max_in_flight: int, on_pause: Callable[[bool], None] | None = None):
        self.c2p_r, self.p2c_w, self.handler = c2p_r, p2c_w, handler
        self.cap, self.max_requests = cap, max_requests
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task] = set()
        self.violation: str | None = None
        self.requests = 0
        self.writer: asyncio.WriteTransport | None = None
        self.read_transport: asyncio.ReadTransport | None = None
        self.clock = WaitClock(on_pause)

    async def run(self, result: asyncio.Future, cancel: Callable[[], None], timeout_s: float,
                  max_wait_s: float = 0.0) -> tuple[Any, str | None]:
        """(the zygote's result, the protocol violation or None). ``asyncio.TimeoutError`` if no result came within
        ``timeout_s``, not counting up to ``max_wait_s`` of the time spent answering requests."""
        reader = asyncio.get_running_loop().create_task(self._serve_requests())
        start, cancelled = time.monotonic(), False
        try:
            while not result.done():
                left = start + timeout_s + min(self.clock.stood_s(), max_wait_s) - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                waiting = {result} if reader.done() else {reader, result}
                await asyncio.wait(waiting, timeout=min(left, 5.0), return_when=asyncio.FIRST_COMPLETED)
                if reader.done() and self.violation and not cancelled:
                    cancel()  # the zygote kills the child and still reports its output
                    cancelled = True
            res = result.result()
        finally:
            reader.cancel()
            await self.close()
        return res, self.violation

    async def _serve_requests(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        self.read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                              os.fdopen(self.c2p_r, "rb", buffering=0))
        self.c2p_r = -1  # owned by the transport now
        self.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(self.p2c_w, "wb", buffering=0))
        self.p2c_w = -1
        while True:
            try:
                head = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                return  # child gone
            (n,) = struct.unpack(">I", head)
            if n > self.cap:
                self.violation = f"rpc frame of {n} bytes exceeds max_message_bytes={self.cap}"
                return
            try:
                msg = json.loads(await reader.readexactly(n))
                rid, request = msg["id"], msg["request"]
            except (asyncio.IncompleteReadError, ValueError, KeyError, TypeError) as e:
                self.violation = f"garbage on the rpc channel ({type(e).__name__})"
                return
            self.requests += 1
            if self.requests > self.max_requests:
                self.violation = f"more than max_requests={self.max_requests} rpc requests"
                return
            self.clock.begin()
            try:
                await self.in_flight.acquire()
            except BaseException:
                self.clock.end()
                raise
            t = asyncio.get_running_loop().create_task(self._answer(rid, request))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _answer(self, rid, request) -> None:
        try:
            try:
                if self.handler is None:
                    raise RuntimeError("no rpc handler in the parent")
                reply = {"id": rid, "reply": await self.handler(request)}
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reply = {"id": rid, "error": f"{type(e).__name__}: {e}"}
            finally:
                self.in_flight.release()
            try:
                data = _encode(reply)
            except (TypeError, ValueError) as e:
                data = _encode({"id": rid, "error": f"handler reply is not JSON: {e}"})
            if self.writer is not None and not self.writer.is_closing():
                self.writer.write(data)  # buffered when the pipe is full; the child is gone if it breaks
        finally:
            self.clock.end()  # the child's clock restarts once the reply is on its way (or the session is over)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for transport in (self.writer, self.read_transport):
            if transport is not None:
                transport.close()
        for fd in (self.c2p_r, self.p2c_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.c2p_r = self.p2c_w = -1


def _encode(obj: dict) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


async def run_entry(entry: str, payload: dict, *, handler: Callable[[dict], Awaitable[dict]] | None = None,
                    limits: SandboxLimits | None = None, max_message_bytes: int = 8 << 20,
                    max_requests: int = 10_000, max_in_flight: int = 64,
                    hide_paths: Iterable[str] | None = None, max_wait_s: float = 0.0) -> SandboxResult:
    """Run ``module:function`` (importable) in a sandboxed child as ``function(payload, rpc)``; its JSON return value
    comes back in ``result.value``.

    ``rpc.call(request)`` (blocking) and ``await rpc.acall(request)`` (several in flight, multiplexed by id) are
    answered by ``await handler(request)`` here; a handler exception reaches the child as RuntimeError. Requests
    beyond ``max_in_flight`` wait in the pipe (back-pressure); a frame over ``max_message_bytes``, a garbage frame or
    more than ``max_requests`` requests ends the child with status 'protocol'. Without a handler every request gets
    an error reply. The child sees the minimal root plus the entry's own package or file (``entry_paths``).
    ``hide_paths``: as for run_program. ``max_wait_s``: up to this many seconds in all, the child's wall clock stands
    still while the handler is answering its requests (0: the handler's time counts against ``limits.wall_s``).
    Many entries: ``SandboxPool.for_entry(...).arun_entry``."""
    if ":" not in entry:
        raise ValueError(f"run_entry: entry {entry!r} must be 'module:function'")
    options = zygote_options(hide_paths, expose=entry_paths(entry))

    def start(task: dict, fds: list[int]):
        # a thread of its own, not the loop's default executor: its few threads are what the handler's own
        # blocking work (a response cache's sqlite, say) needs while many entries wait on their zygotes
        holder: dict[str, _Zygote] = {}
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(_once(task, options, fds, started=lambda z: holder.update(z=z)))
            except BaseException as e:  # noqa: B036 - delivered to the awaiting caller
                future.set_exception(e)

        threading.Thread(target=work, name="sandbox-run-entry", daemon=True).start()
        return (future, lambda: holder["z"].cancel() if "z" in holder else None,
                lambda paused: holder["z"].pause(paused, task["tid"]) if "z" in holder else None)

    return await entry_task(start, entry, payload, handler=handler, limits=limits, max_message_bytes=max_message_bytes,
                        max_requests=max_requests, max_in_flight=max_in_flight, max_wait_s=max_wait_s)


async def entry_task(start, entry: str, payload: dict, *, handler=None, limits: SandboxLimits | None = None,
                 max_message_bytes: int = 8 << 20, max_requests: int = 10_000, max_in_flight: int = 64,
                 default_limits: SandboxLimits | None = None, max_wait_s: float = 0.0) -> SandboxResult:
    if ":" not in entry:
        raise ValueError(f"run_entry: entry {entry!r} must be 'module:function'")
    limits = limits or default_limits or SandboxLimits()
    c2p_r, c2p_w = os.pipe()  # child -> parent requests
    p2c_r, p2c_w = os.pipe()  # parent -> child replies
    task = {"kind": "entry", "entry": entry, "payload": payload, "limits": asdict(limits),
            "max_message_bytes": max_message_bytes, "tid": next(_TASK_IDS), "max_wait_s": float(max_wait_s)}
    t0 = time.monotonic()
    try:
        future, cancel, pause = start(task, [p2c_r, c2p_w])  # the child's ends go to the zygote, closed there
    except BaseException:
        for fd in (c2p_r, p2c_w):
            os.close(fd)
        raise
    session = RpcSession(c2p_r, p2c_w, handler, max_message_bytes, max_requests, max_in_flight,
                         on_pause=pause if max_wait_s > 0 else None)
    wait = _Zygote.START_TIMEOUT_S + limits.wall_s + _Zygote.GRACE_S
    try:
        result, violation = await session.run(asyncio.wrap_future(future), cancel, wait, max_wait_s)
    except asyncio.TimeoutError:
        cancel()
        return _failure("sandbox_error", "no result from the sandbox zygote", time.monotonic() - t0)
    if violation:
        result = replace(result, status="protocol", reason=f"{violation}; child killed")
    return result
