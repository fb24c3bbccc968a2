"""The engine of a run: one server per (model, settings) in this process, shared by every stage that asks.

``with open_engine(options, model, run_dir) as engine:`` launches the server (or finds the one already open in
this process, e.g. ``spogw iterate`` opening it and ``evaluate`` inside it asking again) and stops it when the
outermost ``with`` ends: normally, on an exception, on SIGINT (KeyboardInterrupt) and on SIGTERM/SIGHUP (turned
into SystemExit here so that the same cleanup runs); an ``atexit`` hook is the last net. A ``kill -9`` leaves
the server to the next run (:meth:`spogw.engine.server.EngineServer.launch` adopts or stops it).

Where the server cannot serve, :meth:`Engine.ready` falls back: one line says why and what is used instead
(the transformers backends), and :attr:`EngineServer.reason` records it; ``--engine.fallback false`` raises.
A server that dies mid-run is restarted once (:meth:`recover`), then the run falls back.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from spogw.engine.options import EngineOptions
from spogw.engine.server import EngineServer, EngineUnavailable, say

FALLBACK = "using the transformers backends instead (executor: local, generator: transformers)"


class Engine(EngineServer):
    """An :class:`EngineServer` that falls back instead of failing, and restarts once if it dies mid-run."""

    restarts = 0

    def ready(self) -> Engine | None:  # type: ignore[override]
        """The running server, or None when the run uses the fallback (the message is printed once)."""
        if self.reason is not None:
            return None
        try:
            super().ready()
        except EngineUnavailable as exc:
            self.fall_back(str(exc))
            return None
        return self

    def fall_back(self, cause: str) -> None:
        """Stop using the server for the rest of this process: say why, stop it, or raise with fallback off."""
        self.stop()
        first_line = cause.splitlines()[0]
        if not self.options.fallback:
            raise EngineUnavailable(f"{cause}\n(--engine.fallback false: no transformers fallback)")
        self.reason = first_line
        say(f"{first_line}; {FALLBACK}")

    def recover(self, cause: str) -> None:
        """The server died or misbehaved mid-stage: restart it once, else fall back. Finished work stays on disk."""
        self.stop()
        if self.restarts == 0 and self.reason is None:
            self.restarts += 1
            say(f"{cause.splitlines()[0]}; restarting it (finished work is kept)")
            self.launch()
            self.ready()
            return
        self.fall_back(cause)


_OPEN: dict[tuple, tuple[Engine, int]] = {}
_LOCK = threading.Lock()


def _key(options: EngineOptions, model: str) -> tuple:
    return (model, repr(options))


@contextlib.contextmanager
def open_engine(options: EngineOptions, model: str, run_dir: str | Path) -> Iterator[Engine]:
    """The engine for ``model``: launched now (not waited for), stopped when the outermost user is done."""
    key = _key(options, model)
    with _LOCK:
        engine, users = _OPEN.get(key, (None, 0))
        if engine is None:
            engine = Engine(options, model, run_dir)
        _OPEN[key] = (engine, users + 1)
    restore = _catch_termination() if users == 0 else None
    try:
        if users == 0:
            try:
                engine.launch()
            except EngineUnavailable as exc:
                engine.fall_back(str(exc))
        yield engine
    finally:
        with _LOCK:
            engine, users = _OPEN[key]
            if users == 1:
                del _OPEN[key]
            else:
                _OPEN[key] = (engine, users - 1)
        if users == 1:
            engine.stop()
            if restore is not None:
                restore()


def active_engine(model: str | None = None) -> Engine | None:
    """An engine open in this process (for ``model`` when given), or None."""
    with _LOCK:
        for (m, _), (engine, _) in _OPEN.items():
            if model is None or m == model:
                return engine
    return None


def _stop_all() -> None:
    for engine, _ in list(_OPEN.values()):
        engine.stop()


atexit.register(_stop_all)


def _catch_termination():
    """SIGTERM and SIGHUP raise SystemExit in the main thread (so ``finally`` blocks stop the server); returns the
    function that restores the previous handlers. Outside the main thread there is nothing to install."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
