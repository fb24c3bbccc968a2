"""Sandboxed execution of untrusted, model-written code: workflow classes, the programs they write, and checks.

Four entry points, one mechanism (the isolation itself is ``spogw/runtime/zygote/``, a process of its own):

- ``run_program(code)``: one program in a fresh sandbox (starts a one-shot zygote: ~0.1-0.2 s of set-up).
- ``SandboxPool``: warm zygotes, one forked sandbox per program (a few ms each); ``pool.check(...)`` runs a
  *check* (a solution and its tests in two sandboxed processes, the verdict from the tests' side only: see
  ``spogw/runtime/zygote/check.py``); ``pool.arun_entry(...)`` a pooled ``run_entry``.
- ``run_check(check)``: one check in a fresh sandbox.
- ``run_entry("module:function", payload, handler=...)``: a sandboxed ``function(payload, rpc)`` whose ``rpc``
  asks the parent for things (the LLM executor lives in the parent) over JSON frames on two pipes.

This module holds the limits, the results, the parent's handle on a zygote and the one-shot calls; ``SandboxPool``
lives in ``sandbox_pool.py`` and ``run_entry`` with its RPC session in ``sandbox_rpc.py`` (both importable from
here too).

Children see a minimal read-only root (the system libraries and the interpreter, no site-packages, no checkout,
no home), plus what ``expose`` allows; ``run_entry`` exposes only the entry's own package or file.

Every outcome is a ``SandboxResult`` whose ``status`` is one of ``STATUSES``; nothing a program does raises in the
caller. What protections were active on this machine is in ``SandboxResult.protections`` and ``protections()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
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


def __getattr__(name: str):
    """``SandboxPool`` and ``run_entry`` from their own modules (they import this one)."""
    if name == "SandboxPool":
        from spogw.runtime.sandbox_pool import SandboxPool

        return SandboxPool
    if name == "run_entry":
        from spogw.runtime.sandbox_rpc import run_entry

        return run_entry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
