"""Sandboxed execution of untrusted, model-written code: workflow classes and the programs they write.

Three entry points, one mechanism (see ``_sandbox_child.py`` for the isolation itself):

- ``run_program(code)``: one program in a fresh sandbox (starts a one-shot zygote: ~0.2 s of set-up).
- ``SandboxPool``: warm zygotes, one forked sandbox per program (~5 ms each): HumanEval-style checks.
- ``run_entry("module:function", payload, handler=...)``: a sandboxed ``function(payload, rpc)`` whose ``rpc``
  asks the parent for things (the LLM executor lives in the parent) over JSON frames on two pipes.

Every outcome is a ``SandboxResult`` whose ``status`` is one of ``STATUSES``; nothing a program does raises in the
caller. What protections were active on this machine is in ``SandboxResult.protections`` and ``protections()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))

STATUSES = {
    "ok": "the program finished normally (exit code 0; for run_entry: the function returned a JSON value)",
    "error": "an uncaught exception (reason: 'Type: message'; traceback in stderr), incl. RecursionError",
    "exit": "sys.exit(n) / os._exit(n) with n != 0, or run_entry's process exited without returning",
    "timeout": "wall time or CPU time exceeded; the whole process tree was killed",
    "memory": "MemoryError under RLIMIT_AS, or killed by the cgroup OOM killer",
    "crash": "killed by SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT",
    "killed": "killed by another signal (or the sandbox was torn down)",
    "output": "stdout+stderr exceeded limits.max_output_bytes; killed",
    "protocol": "run_entry only: the child broke the RPC protocol (garbage frame, oversized message, request flood)",
    "sandbox_error": "the sandbox itself failed (set-up refused, zygote died); not the program's fault",
}


@dataclass
class SandboxLimits:
    """Per-program limits. Memory is enforced per process (RLIMIT_AS) and for the whole tree (memory cgroup)."""

    wall_s: float = 10.0
    """Wall-clock seconds before the whole process tree is killed."""
    cpu_s: float = 10.0
    """CPU seconds (RLIMIT_CPU, rounded up to whole seconds) per process; wall_s bounds the whole tree."""
    memory_mb: int = 1024
    """Address space per process (RLIMIT_AS) and memory of all its processes together (cgroup), in MiB."""
    max_procs: int = 32
    """Processes and threads the program may have at once (pids cgroup; RLIMIT_NPROC for its unique uid)."""
    file_size_mb: int = 16
    """Largest file it may write (RLIMIT_FSIZE); its private /tmp holds 4x this (at least 16 MiB)."""
    network: bool = False
    """Allow the host network. Off: an empty network namespace and a seccomp filter on AF_INET/AF_INET6."""
    max_output_bytes: int = 1 << 20
    """stdout+stderr beyond this kills the program (status 'output')."""

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_procs", "file_size_mb", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class SandboxResult:
    """What happened to one program. ``status`` is a key of STATUSES; ``reason`` says why in words."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str
    value: Any = None
    events: list[str] = field(default_factory=list)
    """Notable calls the program made (os.system, socket.connect, os.kill, ...), recorded by an audit hook."""
    cpu_s: float = 0.0
    protections: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _result(d: dict, protections: dict[str, str]) -> SandboxResult:
    names = {f.name for f in fields(SandboxResult)}
    return SandboxResult(**{k: v for k, v in d.items() if k in names}, protections=protections)


def _failure(status: str, reason: str, duration: float = 0.0, protections: dict | None = None) -> SandboxResult:
    return SandboxResult(status, None, "", "", duration, reason, protections=protections or {})


def default_hidden_paths() -> tuple[str, ...]:
    """Paths no sandboxed program may read: the shared benchmark data beside the checkout (ground truth)."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return (str(shared),) if shared.exists() else ()


def _zygote_argv(mode: str, hide: Iterable[str] | None) -> list[str]:
    hide = default_hidden_paths() if hide is None else tuple(hide)
    return [sys.executable, "-I", CHILD, mode, json.dumps({"hide": [str(p) for p in hide]})]


def _child_env() -> dict[str, str]:
    """The zygote's environment: nothing of the parent's (API keys stay out of reach)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _task(code: str | None, limits: SandboxLimits, stdin: str | None, files: dict[str, str] | None, **extra) -> dict:
    return {"code": code, "limits": asdict(limits), "stdin": stdin, "files": files, **extra}


# ---------------------------------------------------------------------------------------------------- frame helpers


def _encode(obj: dict) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks = []
    while n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the sandbox zygote")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("the sandbox zygote closed its pipe")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float, cap: int = 256 << 20) -> dict:
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if n > cap:
        raise ValueError(f"zygote frame of {n} bytes exceeds {cap}")
    return json.loads(_read_exact(fd, n, deadline))


# ----------------------------------------------------------------------------------------------------------- zygote


class _Zygote:
    """A started zygote process: the parent's handle on it (blocking, one task at a time)."""

    START_TIMEOUT_S = 30.0
    GRACE_S = 5.0  # beyond the task's wall limit before the parent gives up on the zygote itself

    def __init__(self, mode: str = "serve", hide: Iterable[str] | None = None):
        self.proc = subprocess.Popen(
            _zygote_argv(mode, hide), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
            close_fds=True, cwd="/",
        )
        try:
            hello = _read_frame(self.proc.stdout.fileno(), time.monotonic() + self.START_TIMEOUT_S)
        except (EOFError, TimeoutError, ValueError) as e:
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {e}") from e
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {hello.get('error')}")
        self.protections: dict[str, str] = hello["protections"]
        self.uid: int = hello["uid"]

    def run(self, task: dict) -> SandboxResult:
        wall = float(task["limits"]["wall_s"])
        try:
            self.proc.stdin.write(_encode(task))
            self.proc.stdin.flush()
            res = _read_frame(self.proc.stdout.fileno(), time.monotonic() + wall + self.GRACE_S)
        except (OSError, EOFError, TimeoutError, ValueError) as e:
            self.close()
            return _failure("sandbox_error", f"sandbox zygote lost: {e!r}", protections=self.protections)
        return _result(res, self.protections)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Closing stdin ends the zygote (and, through the parent-death signal, anything it still runs)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_PROTECTIONS: dict[str, str] | None = None


def protections() -> dict[str, str]:
    """Which protections are active on this machine (starts one zygote once and asks it)."""
    global _PROTECTIONS
    if _PROTECTIONS is None:
        z = _Zygote()
        _PROTECTIONS = z.protections
        z.close()
    return dict(_PROTECTIONS)


# ------------------------------------------------------------------------------------------------------ run_program


def run_program(code: str, *, limits: SandboxLimits | None = None, stdin: str | None = None,
                files: dict[str, str] | None = None, hide_paths: Iterable[str] | None = None) -> SandboxResult:
    """Run a Python program in a fresh sandboxed process (private temp dir, limits, no network).

    ``files`` are written into its working directory first (relative paths only); ``hide_paths`` are made unreadable
    (default: ``default_hidden_paths()``). For many programs use a ``SandboxPool``: this starts (and ends) a
    zygote per call."""
    limits = limits or SandboxLimits()
    t0 = time.monotonic()
    try:
        z = _Zygote("once", hide_paths)
    except RuntimeError as e:
        return _failure("sandbox_error", str(e), time.monotonic() - t0)
    try:
        return z.run(_task(code, limits, stdin, files))
    finally:
        z.close()


# -------------------------------------------------------------------------------------------------------------- pool


class SandboxPool:
    """Warm zygotes (one per worker) that fork one fully isolated sandbox per program.

    Thread-safe; ``map`` keeps order; ``arun`` is for asyncio callers. A zygote that dies is replaced and its task
    reported as ``sandbox_error``; a program can neither signal nor see its zygote (other uid, own pid namespace)."""

    def __init__(self, workers: int | None = None, limits: SandboxLimits | None = None,
                 hide_paths: Iterable[str] | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.limits = limits or SandboxLimits()
        self.hide_paths = None if hide_paths is None else tuple(hide_paths)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
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

    def _worker(self) -> None:
        """Owns one zygote for its whole life (the zygote's parent-death signal is tied to this thread)."""
        zygote = None
        me = threading.get_ident()
        try:
            zygote = self._zygotes[me] = _Zygote(hide=self.hide_paths)
            self.protections = zygote.protections
        except RuntimeError as e:
            self._errors.append(str(e))
        self._started.wait()
        while True:
            item = self._queue.get()
            if item is None:
                break
            fut, task = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if zygote is None or not zygote.alive:
                    zygote = self._zygotes[me] = _Zygote(hide=self.hide_paths)
                res = zygote.run(task)
            except BaseException as e:  # noqa: B036 - a pool worker must survive anything
                res = _failure("sandbox_error", f"sandbox pool worker: {e!r}")
            fut.set_result(res)
        if zygote is not None:
            zygote.close()

    @property
    def uids(self) -> set[int]:
        """The uids the pool's sandboxes run as now (one per worker; a replaced zygote gets a new one)."""
        return {z.uid for z in self._zygotes.values()}

    def submit(self, code: str, *, limits: SandboxLimits | None = None, stdin: str | None = None,
               files: dict[str, str] | None = None) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fut, _task(code, limits or self.limits, stdin, files)))
        return fut

    def run(self, code: str, **kw) -> SandboxResult:
        return self.submit(code, **kw).result()

    def map(self, codes: Iterable[str], **kw) -> list[SandboxResult]:
        """Run every program (``workers`` at a time); results in input order."""
        return [f.result() for f in [self.submit(c, **kw) for c in codes]]

    async def arun(self, code: str, **kw) -> SandboxResult:
        return await asyncio.wrap_future(self.submit(code, **kw))

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


# -------------------------------------------------------------------------------------------------------- run_entry


async def run_entry(entry: str, payload: dict, *, handler: Callable[[dict], Awaitable[dict]] | None = None,
                    limits: SandboxLimits | None = None, max_message_bytes: int = 8 << 20,
                    max_requests: int = 10_000, max_in_flight: int = 64,
                    hide_paths: Iterable[str] | None = None) -> SandboxResult:
    """Run ``module:function`` (importable) in a sandboxed child as ``function(payload, rpc)``; its JSON return value
    comes back in ``result.value``.

    ``rpc.call(request)`` (blocking) and ``await rpc.acall(request)`` (several in flight, multiplexed by id) are
    answered by ``await handler(request)`` here; a handler exception reaches the child as RuntimeError. Requests
    beyond ``max_in_flight`` wait in the pipe (back-pressure); a frame over ``max_message_bytes``, a garbage frame or
    more than ``max_requests`` requests ends the child with status 'protocol'. Without a handler every request gets
    an error reply. ``hide_paths``: as for run_program."""
    limits = limits or SandboxLimits()
    if ":" not in entry:
        raise ValueError(f"run_entry: entry {entry!r} must be 'module:function'")
    c2p_r, c2p_w = os.pipe()  # child -> parent requests
    p2c_r, p2c_w = os.pipe()  # parent -> child replies
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *_zygote_argv("once", hide_paths), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
            pass_fds=(p2c_r, c2p_w), cwd="/",
        )
    finally:
        os.close(p2c_r)
        os.close(c2p_w)
    session = _RpcSession(proc, c2p_r, p2c_w, (p2c_r, c2p_w), handler, max_message_bytes, max_requests,
                          max_in_flight)
    try:
        return await session.run(entry, payload, limits, t0)
    finally:
        await session.close()


class _RpcSession:
    """The parent's side of one run_entry: the zygote's control pipe plus the child's request/reply pipes."""

    def __init__(self, proc, c2p_r: int, p2c_w: int, child_fds: tuple[int, int], handler, cap: int,
                 max_requests: int, max_in_flight: int):
        self.proc, self.c2p_r, self.p2c_w, self.handler = proc, c2p_r, p2c_w, handler
        self.child_fds = child_fds  # the fd numbers the zygote inherited (pass_fds keeps numbers)
        self.cap, self.max_requests = cap, max_requests
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task] = set()
        self.violation: str | None = None
        self.requests = 0
        self.write_lock = asyncio.Lock()
        self.protections: dict[str, str] = {}

    async def run(self, entry: str, payload: dict, limits: SandboxLimits, t0: float) -> SandboxResult:
        loop = asyncio.get_running_loop()
        try:
            hello = await asyncio.wait_for(_aread_frame(self.proc.stdout), _Zygote.START_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            return _failure("sandbox_error", f"sandbox zygote failed to start: {e!r}", time.monotonic() - t0)
        if not hello.get("ready"):
            return _failure("sandbox_error", f"sandbox zygote failed to start: {hello.get('error')}")
        self.protections = hello["protections"]
        task = {"code": None, "limits": asdict(limits), "entry": entry, "payload": payload,
                "rpc": list(self.child_fds), "max_message_bytes": self.cap}
        self.proc.stdin.write(_encode(task))
        await self.proc.stdin.drain()
        reader = loop.create_task(self._serve_requests())
        result_task = loop.create_task(_aread_frame(self.proc.stdout))
        try:
            done, _ = await asyncio.wait({reader, result_task}, timeout=limits.wall_s + _Zygote.GRACE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if reader in done and self.violation:
                self.proc.stdin.close()  # the zygote kills the child on EOF and still reports its output
            res = await asyncio.wait_for(result_task, timeout=limits.wall_s + _Zygote.GRACE_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            self._kill()
            return _failure("sandbox_error", f"sandbox zygote lost: {e!r}", time.monotonic() - t0, self.protections)
        finally:
            reader.cancel()
        result = _result(res, self.protections)
        if self.violation:
            result = replace(result, status="protocol", reason=f"{self.violation}; child killed")
        return result

    async def _serve_requests(self) -> None:
        """Read request frames from the child; answer each in its own task (bounded by ``in_flight``)."""
        reader = await _pipe_reader(self.c2p_r)
        self.c2p_r = -1  # owned by the transport now
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
        async with self.write_lock:
            await asyncio.get_running_loop().run_in_executor(None, _write_all, self.p2c_w, data)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # the child dies with it (parent-death signal; it is pid 1 of its namespace)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 2)
            except asyncio.TimeoutError:
                self._kill()
                await self.proc.wait()
        for fd in (self.c2p_r, self.p2c_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # the child is gone; its result says why


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


async def _aread_frame(stream: asyncio.StreamReader, cap: int = 256 << 20) -> dict:
    (n,) = struct.unpack(">I", await stream.readexactly(4))
    if n > cap:
        raise ValueError(f"zygote frame of {n} bytes exceeds {cap}")
    return json.loads(await stream.readexactly(n))
