"""The parent's side of ``run_entry``'s RPC: requests from a sandboxed child answered by an async handler.

The child's requests arrive on a pipe of their own (JSON frames: 4-byte length + JSON ``{"id", "request"}``) and
each is answered in its own task by ``await handler(request)``, at most ``max_in_flight`` at a time (beyond that
the parent stops reading: back-pressure). A frame over ``max_message_bytes``, a garbage frame or more than
``max_requests`` requests is a protocol violation: the child is cancelled (the zygote kills it and still reports
its output) and the result's status becomes ``protocol``. Used by ``spogw.runtime.sandbox.run_entry`` and
``SandboxPool.arun_entry``, which differ only in which zygote runs the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any


class RpcSession:
    """Serve one child's requests until its result (a future from the zygote's worker) is in."""

    def __init__(self, c2p_r: int, p2c_w: int, handler: Callable[[dict], Awaitable[Any]] | None, cap: int,
                 max_requests: int, max_in_flight: int):
        self.c2p_r, self.p2c_w, self.handler = c2p_r, p2c_w, handler
        self.cap, self.max_requests = cap, max_requests
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task] = set()
        self.violation: str | None = None
        self.requests = 0
        self.writer: asyncio.WriteTransport | None = None
        self.read_transport: asyncio.ReadTransport | None = None

    async def run(self, result: asyncio.Future, cancel: Callable[[], None], timeout_s: float) -> tuple[Any, str | None]:
        """(the zygote's result, the protocol violation or None). ``asyncio.TimeoutError`` if no result came."""
        reader = asyncio.get_running_loop().create_task(self._serve_requests())
        try:
            done, _ = await asyncio.wait({reader, result}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and self.violation:
                cancel()  # the zygote kills the child and still reports its output
            res = await asyncio.wait_for(asyncio.shield(result), timeout=timeout_s)
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
            await self.in_flight.acquire()
            t = asyncio.get_running_loop().create_task(self._answer(rid, request))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _answer(self, rid, request) -> None:
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
            self.writer.write(data)  # buffered by the transport when the pipe is full; the child is gone if it breaks

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
