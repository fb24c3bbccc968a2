"""The template: a pristine process that forks every sandboxed child, so no child inherits any task's data.

The zygote reads tasks (code, tests, outputs, verdicts) into its own memory; a child forked from it would
inherit that heap, the current task's hidden tests and the leftovers of earlier tasks included. So the zygote
forks the template right after its set-up, before it reads any task, and never forks a child itself:

    zygote ──socketpair──> template      fork request: {role, limits, uid, ...} + the child's fds (SCM_RIGHTS)
                              │           reply: {pid} + a pidfd on the child; later {exit: pid, status, cpu}
                              └─ unshare(PID) + fork ─> child G (pid 1 of its own pid namespace) -> child.main

The template never reads a payload: a task's code arrives in a memfd that it passes on unread. It builds the
children's minimal root once (``rootfs.build``) and pivots into it, so children start there. It is a child
subreaper and reaps everything (children, and orphans where there is no pid namespace), reporting the exit
status and CPU time of the children it forked.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket

from . import linux, rootfs, wire
from .linux import CLONE_NEWNS, CLONE_NEWPID, MNT_DETACH, MS_PRIVATE, MS_REC


def start(z) -> tuple[int, socket.socket]:
    """Fork the template from the zygote ``z`` (after its set-up); returns (pid, the zygote's end of the socket)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            mine.close()
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)  # the zygote's control socket (fd 0) is not the template's to hold
            os.close(null)
            serve(z, theirs)
        finally:
            os._exit(0)
    theirs.close()
    return pid, mine


def _root(z) -> dict:
    """The children's filesystem view, made in the template's own mount namespace."""
    if not z.mount_ns:
        return {"root": "inactive: no mount namespace; children see the host's filesystem", "minimal": False}
    try:
        linux.unshare(CLONE_NEWNS)
        linux.mount("none", "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        return {"root": f"inactive: {e}", "minimal": False}
    try:
        bound = rootfs.build(z.expose, z.hide, z.site_packages)
        return {"minimal": True, "bound": bound,
                "root": "active: a minimal read-only root holding only the system libraries, the interpreter "
                        f"({'with' if z.site_packages else 'without'} site-packages) and {', '.join(bound)}"}
    except OSError as e:
        with contextlib.suppress(OSError):
            linux.umount(rootfs.STAGE, MNT_DETACH)
        hidden = rootfs.legacy_view(z.hide)
        return {"minimal": False, "hidden": hidden,
                "root": f"inactive: {e}; children see the host's filesystem read-only"
                        + (f", {', '.join(hidden)} covered" if hidden else "")}


def serve(z, sock: socket.socket) -> None:
    """The template's life: build the root, then fork on request and report exits until the zygote goes."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    view = _root(z)
    for network in (False, True):  # built once here, not in every child
        linux.seccomp_program(network)
    import gc

    gc.collect()
    gc.freeze()  # what every child inherits is never traversed by its collector (fewer copy-on-write faults)
    z.minimal = view["minimal"]
    z.bound = view.get("bound", [])
    wire.send(sock, {"ready": True, **view})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    known: set[int] = set()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            else:
                try:
                    req, fds = wire.recv(sock)
                except (EOFError, OSError, ValueError):
                    return
                if req.get("op") == "fork":
                    pid, pidfd = _spawn(z, req, fds, (sock.fileno(), wake_r, wake_w))
                    known.add(pid)
                    wire.send(sock, {"pid": pid}, [pidfd] if pidfd >= 0 else [])
                    if pidfd >= 0:
                        os.close(pidfd)
        _reap(sock, known)


def _spawn(z, req: dict, fds: list[int], mine: tuple[int, ...]) -> tuple[int, int]:
    from . import child

    if z.own_pid_fd is not None:
        linux.unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
        if pid == 0:  # ------------------------------------------------------------------------------ child G
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in mine:
                    os.close(fd)
                child.main(z, req, fds)
            finally:
                os._exit(111)
    finally:
        if z.own_pid_fd is not None:  # (the child never gets here: it ends in os._exit)
            linux.setns(z.own_pid_fd, CLONE_NEWPID)  # so the next unshare(CLONE_NEWPID) is allowed
        for fd in fds:
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    return pid, pidfd


def _reap(sock: socket.socket, known: set[int]) -> None:
    while True:
        try:
            pid, status, rusage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        if pid in known:
            known.discard(pid)
            wire.send(sock, {"exit": pid, "status": status, "cpu": rusage.ru_utime + rusage.ru_stime})


class Template:
    """The zygote's handle on its template: fork requests, and exit reports collected as they arrive."""

    def __init__(self, z):
        self.pid, self.sock = start(z)
        self.exits: dict[int, dict] = {}
        self._forgotten: set[int] = set()
        hello = self._next()
        self.view = hello

    def _next(self) -> dict:
        while True:
            msg, fds = wire.recv(self.sock)
            if "exit" in msg:
                self._record(msg)
                for fd in fds:
                    os.close(fd)
                continue
            msg["_fds"] = fds
            return msg

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, children: list[tuple[dict, list[int]]]) -> list[tuple[int, int]]:
        """Fork children, each with its fds (closed here once sent); returns [(pid, pidfd or -1)].

        The requests are sent back to back and answered in order, so a check's two children cost one round trip."""
        try:
            for req, fds in children:
                wire.send(self.sock, {"op": "fork", **req}, fds)
        finally:
            for _, fds in children:
                for fd in fds:
                    os.close(fd)
        out = []
        for _ in children:
            reply = self._next()
            got = reply.pop("_fds")
            out.append((int(reply["pid"]), got[0] if got else -1))
        return out

    def pump(self) -> None:
        """Read one pending message (the socket polled readable): an exit report."""
        msg, fds = wire.recv(self.sock)
        for fd in fds:
            os.close(fd)
        if "exit" in msg:
            self._record(msg)

    def _record(self, msg: dict) -> None:
        pid = int(msg["exit"])
        if pid in self._forgotten:
            self._forgotten.discard(pid)
        else:
            self.exits[pid] = msg

    def forget(self, pid: int) -> None:
        """Its exit report, when it comes, is dropped (the zygote did not wait for it)."""
        if self.exits.pop(pid, None) is None:
            self._forgotten.add(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(ChildProcessError, OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
