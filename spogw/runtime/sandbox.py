"""Sandboxed execution of untrusted, model-written code: workflow classes, the programs they write, and checks.

Four entry points, one mechanism (the isolation itself is ``spogw/runtime/zygote/``, a process of its own):

- ``run_program(code)``: one program in a fresh sandbox (starts a one-shot zygote: ~0.1-0.2 s of set-up).
- ``SandboxPool``: warm zygotes, one forked sandbox per program (a few ms each); ``pool.check(...)`` runs a
  *check* (a solution and its tests in two sandboxed processes, the verdict from the tests' side only: see
  ``spogw/runtime/zygote/check.py``); ``pool.arun_entry(...)`` a pooled ``run_entry``.
- ``run_check(check)``: one check in a fresh sandbox.
- ``run_entry("module:function", payload, handler=...)``: a sandboxed ``function(payload, rpc)`` whose ``rpc``
  asks the parent for things (the LLM executor lives in the parent) over JSON frames on two pipes.

Children see a minimal read-only root (the system libraries and the interpreter, no site-packages, no checkout,
no home), plus what ``expose`` allows; ``run_entry`` exposes only the entry's own package or file.

Every outcome is a ``SandboxResult`` whose ``status`` is one of ``STATUSES``; nothing a program does raises in the
caller. What protections were active on this machine is in ``SandboxResult.protections`` and ``protections()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import itertools
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ZYGOTE = str(Path(__file__).with_name("zygote"))

STATUSES = {
    "ok": "the program finished normally (exit code 0; for run_entry: the function returned a JSON value; for a "
          "check: the tests ran to their verdict, in SandboxResult.verdict)",
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
    """Wall-clock seconds before the whole process tree is killed. An entry's clock stands still while the parent
    answers one of its RPC requests (those calls have limits of their own): a busy machine is not its timeout."""
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
    verdict: dict | None = None
    """Checks only: the tests' report, read from the channel only the tests' process holds: ``passed``/``failed``
    asserts, ``final`` (``PASS``, ``FAIL`` or None when the tests did not finish), ``fail`` (stage, error,
    message, where), ``notes``, ``stderr`` (the tests' own). stdout/stderr/events above are the solution's."""
    solution: dict | None = None
    """Checks only: the solution process's status, reason and exit code (diagnostics; never a verdict)."""
    waited_s: float = 0.0
    """Entries only: the seconds not counted against ``wall_s``: the parent was answering the child's requests."""
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
    """Paths no sandboxed program may read: the shared benchmark data beside the checkout (ground truth).

    The children's minimal root holds no such path anyway; this matters where it cannot be built (legacy view)."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return (str(shared),) if shared.exists() else ()


def entry_paths(entry: str) -> list[str]:
    """What a child needs bound in to import ``entry``: its file, or its top-level package (not the stdlib)."""
    mod = entry.rpartition(":")[0]
    if mod.endswith(".py"):
        return [os.path.realpath(mod)]
    spec = importlib.util.find_spec(mod.split(".")[0])
    if spec is None:
        return []
    paths = list(spec.submodule_search_locations or ([spec.origin] if spec.origin and os.path.isabs(spec.origin)
                                                      else []))
    stdlib = os.path.realpath(os.path.join(sys.base_prefix, "lib"))
    return [os.path.realpath(p) for p in paths if not os.path.realpath(p).startswith(stdlib + os.sep)
            or "-packages" in p]


def zygote_options(hide_paths: Iterable[str] | None = None, expose: Iterable[str] = (), site_packages: bool = False,
                   preload: Iterable[str] = ()) -> dict:
    hide = default_hidden_paths() if hide_paths is None else tuple(hide_paths)
    return {"hide": [str(p) for p in hide], "expose": [str(p) for p in expose], "site_packages": site_packages,
            "preload": list(preload)}


def _child_env() -> dict[str, str]:
    """The zygote's environment: nothing of the parent's (API keys stay out of reach)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _task(code: str | None, limits: SandboxLimits, stdin: str | None, files: dict[str, str] | None) -> dict:
    return {"kind": "program", "code": code, "limits": asdict(limits), "stdin": stdin, "files": files}


def _check_task(check: dict, limits: SandboxLimits) -> dict:
    """``check``: {preamble, solution, tests, remote (names bound to the solution), imports (statements T runs)}."""
    missing = {"preamble", "solution", "tests"} - set(check)
    if missing:
        raise ValueError(f"a check needs {sorted(missing)}")
    return {"kind": "check", "check": {"remote": [], "imports": [], **check}, "limits": asdict(limits)}


# ----------------------------------------------------------------------------------------------------------- zygote


class _Zygote:
    """A started zygote process: the parent's handle on it (one task at a time; ``cancel`` from any thread)."""

    # a zygote imports little, but on 2 busy cores (an engine, a sweep, 30 other zygotes starting) 30 s was
    # seen to pass: a slow start is the machine's, not the program's, and must not fail its workflow
    START_TIMEOUT_S = 120.0
    GRACE_S = 5.0  # beyond the task's wall limit before the parent gives up on the zygote itself

    def __init__(self, mode: str = "serve", options: dict | None = None):
        from spogw.runtime.zygote import wire

        self._wire = wire
        self._lock = threading.Lock()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-I", ZYGOTE, mode, json.dumps(options or zygote_options())]
            self.proc = subprocess.Popen(argv, stdin=theirs, stdout=subprocess.DEVNULL, env=_child_env(),
                                         close_fds=True, cwd="/")
        finally:
            theirs.close()
        try:
            self.sock.settimeout(self.START_TIMEOUT_S)
            hello, _ = wire.recv(self.sock)
        except (EOFError, OSError, ValueError) as e:
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {e!r}") from e
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {hello.get('error')}")
        self.protections: dict[str, str] = hello["protections"]
        self.uids: list[int] = list(hello["uids"])
        self._paused_since: float | None = None
        self._stood = 0.0
        self._tid = None  # the running task's id: a pause for an earlier task is dropped

    def run(self, task: dict, fds: Iterable[int] = ()) -> SandboxResult:
        """Send the task (``fds`` ride along and are closed here), wait for its result."""
        fds = list(fds)
        wall = float(task["limits"]["wall_s"]) + self.GRACE_S
        max_wait = float(task.get("max_wait_s") or 0.0)
        try:
            with self._lock:
                self._paused_since, self._stood, self._tid = None, 0.0, task.get("tid")
                self.sock.settimeout(wall)
                self._wire.send(self.sock, task, fds)
                start = time.monotonic()
        except OSError as e:
            self.close()
            return _failure("sandbox_error", f"sandbox zygote lost: {e!r}", protections=self.protections)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            while True:  # the zygote's deadline moves while it is paused; so does ours
                paused, now = self._paused_since, time.monotonic()
                stood = self._stood + (now - paused if paused is not None else 0.0)
                left = start + wall + min(stood, max_wait) - now
                if left <= 0:
                    raise TimeoutError(f"no result {wall:g} s after the task's wall limit")
                if select.select([self.sock], [], [], min(left, 5.0))[0]:
                    break
            res, _ = self._wire.recv(self.sock)
            with self._lock:
                self._tid = None
        except (OSError, EOFError, ValueError) as e:  # socket.timeout is an OSError
            self.close()
            return _failure("sandbox_error", f"sandbox zygote lost: {e!r}", protections=self.protections)
        return _result(res, self.protections)

    def cancel(self) -> None:
        """Kill the running task's children (its result still comes back from ``run``)."""
        with contextlib.suppress(OSError), self._lock:
            self._wire.send(self.sock, {"op": "cancel"})

    def pause(self, paused: bool, tid) -> None:
        """Stop (``True``) or restart the wall clock of entry task ``tid``: the parent is answering its requests."""
        with contextlib.suppress(OSError), self._lock:
            if tid is None or tid != self._tid:
                return
            if paused and self._paused_since is None:
                self._paused_since = time.monotonic()
            elif not paused and self._paused_since is not None:
                self._stood += time.monotonic() - self._paused_since
                self._paused_since = None
            else:
                return
            self._wire.send(self.sock, {"op": "pause" if paused else "resume", "tid": tid})

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Closing the socket ends the zygote (and, through the parent-death signals, everything it runs)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_PROTECTIONS: dict[str, str] | None = None
_TASK_IDS = itertools.count(1)  # entry tasks' ids, for their pause/resume frames


def protections() -> dict[str, str]:
    """Which protections are active on this machine (starts one zygote once and asks it)."""
    global _PROTECTIONS
    if _PROTECTIONS is None:
        z = _Zygote()
        _PROTECTIONS = z.protections
        z.close()
    return dict(_PROTECTIONS)


def _once(task: dict, options: dict, fds: Iterable[int] = (), started: Callable | None = None) -> SandboxResult:
    t0 = time.monotonic()
    try:
        z = _Zygote("once", options)
    except RuntimeError as e:
        for fd in fds:
            os.close(fd)
        return _failure("sandbox_error", str(e), time.monotonic() - t0)
    if started is not None:
        started(z)
    try:
        return z.run(task, fds)
    finally:
        z.close()


def run_program(code: str, *, limits: SandboxLimits | None = None, stdin: str | None = None,
                files: dict[str, str] | None = None, hide_paths: Iterable[str] | None = None,
                expose: Iterable[str] = (), site_packages: bool = False) -> SandboxResult:
    """Run a Python program in a fresh sandboxed process (private temp dir, limits, no network).

    ``files`` are written into its working directory first (relative paths only); ``expose`` binds more paths
    read-only into its root, ``site_packages`` the interpreter's site-packages; ``hide_paths`` are covered
    (default: ``default_hidden_paths()``). For many programs use a ``SandboxPool``: this starts a zygote per call."""
    limits = limits or SandboxLimits()
    return _once(_task(code, limits, stdin, files), zygote_options(hide_paths, expose, site_packages))


def run_check(check: dict, *, limits: SandboxLimits | None = None, hide_paths: Iterable[str] | None = None
              ) -> SandboxResult:
    """One check (see ``spogw/runtime/zygote/check.py``) in a fresh sandbox; ``SandboxPool.check`` for many."""
    return _once(_check_task(check, limits or SandboxLimits()), zygote_options(hide_paths))


# -------------------------------------------------------------------------------------------------------------- pool


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

        return await _entry(start, entry, payload, **kw, default_limits=self.limits)

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


# -------------------------------------------------------------------------------------------------------- run_entry


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

    return await _entry(start, entry, payload, handler=handler, limits=limits, max_message_bytes=max_message_bytes,
                        max_requests=max_requests, max_in_flight=max_in_flight, max_wait_s=max_wait_s)


async def _entry(start, entry: str, payload: dict, *, handler=None, limits: SandboxLimits | None = None,
                 max_message_bytes: int = 8 << 20, max_requests: int = 10_000, max_in_flight: int = 64,
                 default_limits: SandboxLimits | None = None, max_wait_s: float = 0.0) -> SandboxResult:
    from spogw.runtime.sandbox_rpc import RpcSession

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
