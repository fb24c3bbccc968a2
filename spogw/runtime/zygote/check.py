"""The check protocol: a solution judged by its tests, each in a sandboxed process of its own.

    S (solution; untrusted)                             T (tests; trusted code)
      runs the preamble and the solution                  runs the preamble; binds the names under test
      says "ready" (or how loading failed)  ──fd 5──>     (the entry point, ...) to proxies; runs the tests
      serves calls: decode args, call, encode  <──fd 4──  each call: plain args out, a reply back, decoded
      the result (or the exception's name)  ──fd 5──>     by ``plain.decode`` into T's own plain values
                                                          per-assert outcomes and the verdict ──fd 6──> zygote

S and T share no memory, interpreter or builtins (two processes forked from the pristine template, separate pid
namespaces, separate uids, T not dumpable). The only thing that crosses from S to T is bytes on fd 5, and T
builds from them only plain values (``plain``), so every comparison the tests make is between T's own objects:
an ``__eq__`` that is always true, a patched ``sys.exit``/``exec``/``compile``, a tracer or a swapped
``check.__code__`` all act on S's interpreter, where there are no tests to fool. The verdict travels on fd 6,
which S never holds; S's stdout, stderr and exit status are diagnostics only.

An exception raised by the solution comes back as its class's MRO names and its message and is raised in T as
a fresh exception: the first builtin ``Exception`` subclass in that MRO (``ValueError``, ``ZeroDivisionError``),
or a new class of the same name deriving from it (never ``SystemExit``/``KeyboardInterrupt`` themselves). A
solution process that dies mid-call makes that call, and every later one, raise in T.

Partial credit: the tests' asserts are rewritten by the parent (``spogw.benchmarks.code_exec``) to call
``__spogw_assert__(ok, line)``, which writes ``P <line>`` or ``F <line>`` on fd 6 as each assert executes; T
ends with ``PASS`` or ``FAIL <json>``. The zygote counts these lines; a T killed mid-way keeps what it wrote.
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import traceback

from . import plain

REQ_FD, REP_FD, VERDICT_FD = 4, 5, 6
_HEAD = struct.Struct(">IB")  # body length, kind


def _send(fd: int, kind: bytes, body: bytes) -> None:
    data = _HEAD.pack(len(body), kind[0]) + body
    while data:
        data = data[os.write(fd, data):]


def _read(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("channel closed")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _recv(fd: int, cap: int) -> tuple[bytes, bytes]:
    n, kind = _HEAD.unpack(_read(fd, _HEAD.size))
    if n > cap:
        raise ValueError(f"a frame of {n:,} bytes (at most {cap:,})")
    return bytes([kind]), _read(fd, n)


def _where(exc: BaseException, files: tuple[str, ...]) -> list | None:
    last = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename in files:
            last = [frame.f_code.co_filename, line]
    return last


def _text(obj) -> str:
    try:
        return str(obj)[:1000]
    except BaseException:  # noqa: B036 - a solution's __str__ may raise anything
        return "<unprintable>"


# --------------------------------------------------------------------------------------------- S: the solution side


def serve_solution(payload: dict) -> None:
    """Load the solution, say so on fd 5, then answer calls from fd 4 until it closes."""
    ns = {"__name__": "__spogw_solution__"}
    stage = "preamble"
    try:
        exec(compile(payload["preamble"], "<preamble>", "exec"), ns)
        stage = "solution"
        exec(compile(payload["solution"], "<solution>", "exec"), ns)
    except BaseException as e:  # noqa: B036 - whatever loading raised is the solution's failure
        traceback.print_exc()
        info = {"stage": stage, "error": type(e).__name__, "message": _text(e)[:300],
                "where": _where(e, ("<preamble>", "<solution>"))}
        _send(REP_FD, b"x", json.dumps(info).encode())
        return
    _send(REP_FD, b"r", b"")
    while True:
        try:
            _, body = _recv(REQ_FD, plain.MAX_BYTES)
        except (EOFError, OSError):
            return
        try:
            name, args, kwargs = plain.decode(body)
            fn = ns.get(name)
            if fn is None:
                raise NameError(f"name {name!r} is not defined")
            reply = plain.encode(fn(*args, **kwargs))
        except BaseException as e:  # noqa: B036 - sys.exit in the function under test is a raise, like any other
            where = _where(e, ("<solution>",))
            info = {"mro": [c.__name__ for c in type(e).__mro__][:32], "msg": _text(e),
                    "line": where[1] if where else None}
            _send(REP_FD, b"e", json.dumps(info).encode())
            continue
        _send(REP_FD, b"v", reply)


# --------------------------------------------------------------------------------------------------- T: the tests


class SolutionError(Exception):
    """Raised in the tests when a call could not get a plain answer from the solution's process."""


class _Verdict:
    """What T reports on fd 6, one line per event (the zygote counts them)."""

    def __init__(self, fd: int):
        self.fd, self.notes = fd, 0

    def _line(self, data: bytes) -> None:
        _send_raw(self.fd, data + b"\n")

    def assert_outcome(self, ok: bool, line: int) -> None:
        self._line(b"%s %d" % (b"P" if ok else b"F", int(line)))

    def note(self, text: str) -> None:
        if self.notes < 8:
            self.notes += 1
            self._line(b"N " + json.dumps(text[:300]).encode())

    def passed(self) -> None:
        self._line(b"PASS")

    def failed(self, info: dict) -> None:
        self._line(b"FAIL " + json.dumps(info).encode())


def _send_raw(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class _Channel:
    """T's end of the pipes to S."""

    def __init__(self, verdict: _Verdict):
        self.verdict = verdict
        self.broken: str | None = None

    def hello(self) -> dict | None:
        """None when the solution loaded; else how it failed (its own report, or what went wrong reading it)."""
        try:
            kind, body = _recv(REP_FD, 1 << 16)
        except (EOFError, OSError, ValueError) as e:
            return {"stage": "solution", "error": "SolutionError",
                    "message": f"the solution's process ended before it finished loading ({type(e).__name__})"}
        if kind == b"r":
            return None
        info = {}
        if kind == b"x":
            try:
                info = json.loads(body)
            except ValueError:
                info = {}
        if not isinstance(info, dict):
            info = {}
        where = info.get("where")
        return {"stage": "preamble" if info.get("stage") == "preamble" else "solution",
                "error": _text(info.get("error", "SolutionError"))[:100],
                "message": _text(info.get("message", ""))[:300],
                "where": [str(where[0])[:20], int(where[1])] if isinstance(where, list) and len(where) == 2
                and isinstance(where[1], int) else None}

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.broken:
            raise SolutionError(self.broken)
        try:
            data = plain.encode((name, list(args), kwargs))
        except plain.NotPlain as e:
            raise TypeError(f"the tests passed {name} an argument that is not plain data: {e}") from None
        try:
            _send(REQ_FD, b"c", data)
            kind, body = _recv(REP_FD, plain.MAX_BYTES)
        except (EOFError, OSError):
            self.broken = f"the solution's process ended during a call to {name} (it exited before the tests finished)"
            raise SolutionError(self.broken) from None
        except ValueError as e:
            self.broken = f"the solution broke the check protocol: {e}"
            raise SolutionError(self.broken) from None
        if kind == b"v":
            try:
                value = plain.decode(body)
            except plain.NotPlain as e:
                raise SolutionError(f"{name} returned something that is not plain data: {e}") from None
            for type_name in plain.opaque_names(value, 2):
                self.verdict.note(f"{name} returned a {type_name}: not plain data, only its truth value crossed")
            return value
        if kind == b"e":
            raise _rebuild(body)
        self.broken = f"the solution broke the check protocol (a frame of kind {kind!r})"
        raise SolutionError(self.broken)


def _rebuild(body: bytes) -> Exception:
    """A fresh exception standing for the solution's (see the module docstring)."""
    try:
        info = json.loads(body)
        names = [n for n in info["mro"] if isinstance(n, str)][:32]
        msg = _text(info.get("msg", ""))
        line = info.get("line")
    except (ValueError, KeyError, TypeError):
        return SolutionError("the solution raised, and its report was unreadable")
    if isinstance(line, int):
        msg = f"{msg} (raised at solution line {line})"
    first = names[0] if names and names[0].isidentifier() and len(names[0]) <= 100 else "SolutionError"
    base: type = Exception
    for n in names:
        cls = getattr(builtins, n, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            base = cls
            break
    if base.__name__ == first:
        try:
            return base(msg)
        except Exception:  # e.g. UnicodeDecodeError needs five arguments
            base = Exception
    try:
        return type(first, (base,), {"__module__": "solution"})(msg)
    except Exception:
        return type(first, (Exception,), {"__module__": "solution"})(msg)


class Remote:
    """A name under test, in T: calling it calls the solution's function of that name in S."""

    def __init__(self, channel: _Channel, name: str):
        self._channel, self.__name__, self.__qualname__ = channel, name, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<the solution's {self.__name__}>"


def run_tests(payload: dict) -> None:
    """Judge: wait for the solution to load, run the preamble and the tests against it, report on fd 6."""
    verdict = _Verdict(VERDICT_FD)
    channel = _Channel(verdict)
    failure = channel.hello()
    if failure is not None:
        verdict.failed(failure)
        return
    ns = {"__name__": "__spogw_tests__", "__spogw_assert__": verdict.assert_outcome}
    stage = "preamble"
    try:
        exec(compile(payload["preamble"], "<preamble>", "exec"), ns)
        for name in payload.get("remote") or ():
            ns[name] = Remote(channel, name)
        for statement in payload.get("imports") or ():
            exec(compile(statement, "<imports>", "exec"), ns)
        stage = "tests"
        exec(compile(payload["tests"], "<tests>", "exec"), ns)
    except BaseException as e:  # noqa: B036 - a failing test, a solution's exception, a timeout-less hang's end
        traceback.print_exc()
        verdict.failed({"stage": stage, "error": type(e).__name__, "message": _text(e)[:300],
                        "where": _where(e, ("<tests>", "<preamble>", "<imports>"))})
        return
    verdict.passed()
