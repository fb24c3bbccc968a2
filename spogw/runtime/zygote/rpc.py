"""run_entry's child side: import ``module:function`` and call ``function(payload, rpc)``; ``rpc`` talks to the
parent over two pipes (fd 4: replies in, fd 5: requests out) in JSON frames, requests multiplexed by id."""

from __future__ import annotations

import json

from .wire import read_frame, write_all


def run_entry(task: dict):
    """Import ``module:function`` (or ``/path/file.py:function``) and call it; a coroutine result is awaited."""
    import asyncio
    import importlib

    mod_name, _, fn_name = task["entry"].rpartition(":")
    if mod_name.endswith(".py"):  # a file path: load it as a module of its own
        import importlib.util

        spec = importlib.util.spec_from_file_location("_sandbox_entry", mod_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name)
    rpc = ChildRPC(4, 5, int(task.get("max_message_bytes", 8 << 20)))
    out = fn(task.get("payload"), rpc)
    if asyncio.iscoroutine(out):
        out = asyncio.run(out)
    json.dumps(out)  # a non-JSON result is the entry's error, raised here with its own message
    return out


class ChildRPC:
    """The child's end of run_entry's RPC: JSON frames over two pipes; requests multiplexed by id.

    ``call(request)`` blocks; ``await acall(request)`` lets several requests be in flight. A reply frame is
    {"id", "reply"} or {"id", "error"}; an error is raised here as RuntimeError."""

    def __init__(self, rfd: int, wfd: int, cap: int):
        import threading

        self._rfd, self._wfd, self._cap = rfd, wfd, cap
        self._lock = threading.Lock()
        self._next = 0
        self._waiters: dict[int, tuple] = {}
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="rpc-reader", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while True:
                msg = read_frame(self._rfd, self._cap)
                waiter = self._waiters.pop(int(msg["id"]), None)
                if waiter:
                    waiter[1](msg)
        except BaseException as e:  # noqa: B036
            self._closed = f"rpc channel closed: {e!r}"
            for _, resolve in list(self._waiters.values()):
                resolve({"error": self._closed})
            self._waiters.clear()

    def _send(self, request: dict, resolve) -> None:
        import struct

        if self._closed:
            raise RuntimeError(self._closed)
        with self._lock:
            self._next += 1
            rid = self._next
            self._waiters[rid] = (rid, resolve)
            data = json.dumps({"id": rid, "request": request}).encode()
            if len(data) > self._cap:
                self._waiters.pop(rid, None)
                raise ValueError(f"rpc request of {len(data)} bytes exceeds the cap of {self._cap}")
            write_all(self._wfd, struct.pack(">I", len(data)) + data)

    @staticmethod
    def _unwrap(msg: dict) -> dict:
        if "error" in msg:
            raise RuntimeError(f"rpc: {msg['error']}")
        return msg.get("reply")

    def call(self, request: dict) -> dict:
        import threading

        done = threading.Event()
        box: list[dict] = []

        def resolve(msg: dict) -> None:
            box.append(msg)
            done.set()

        self._send(request, resolve)
        done.wait()
        return self._unwrap(box[0])

    async def acall(self, request: dict) -> dict:
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def resolve(msg: dict) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(msg))

        self._send(request, resolve)
        return self._unwrap(await fut)
