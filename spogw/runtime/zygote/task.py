"""One task in the zygote: spawn its child(ren) through the template, watch them, classify the outcome.

A task is a ``program``, an ``entry`` (run_entry; its RPC pipes come from the parent) or a ``check`` (two
children, S and T: ``check.py``). The payload goes into a memfd that only the child reads; the template forks the
children (a check's two in one round trip). Then the zygote polls their stdout/stderr/meta/set-up channels until
the task ends (its only child exits; for a check, T exits and S is killed without waiting), its wall deadline
passes, its output exceeds the cap, or the parent cancels it; kills what is left, collects the exit reports and
classifies (``outcome.py``). The verdict channel of a check is drained on every pass, not polled.

An entry's wall clock stops while the parent is answering one of its RPC requests (the parent sends ``pause`` and
``resume``), for at most the task's ``max_wait_s`` in all: an executor call that waits in a queue or a program run
with limits of its own is the parent's time, not the workflow's, so how busy the machine is cannot turn a workflow
into a timeout. CPU time still counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import time

from . import outcome, wire

MAX_VERDICT = 16 << 20


class Kid:
    """The zygote's view of one child: its pid, pidfd, channels and, once reported, its exit."""

    def __init__(self, role: str, pid: int, pidfd: int, readers: dict[str, int], stdin: tuple[int, bytes]):
        self.role, self.pid, self.pidfd = role, pid, pidfd
        self.readers = readers  # name -> read end
        self.out = {name: bytearray() for name in ("stdout", "stderr", "meta", "setup", "verdict")}
        self.stdin_w, self.stdin_data = stdin
        self.status: int | None = None
        self.cpu = 0.0
        self.killed = False
        self.abandoned = False  # killed without awaiting its exit (a check's solution once the tests are done)

    def kill(self) -> None:
        if self.status is not None or self.killed:
            return
        self.killed = True
        with contextlib.suppress(OSError):
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)  # no pid namespace: its process group (it called setsid)



class TaskRunner:
    """The per-task half of ``Zygote`` (it provides template, prot, uid, uid_tests, ctl, mount_ns, cgroups)."""

    def run(self, task: dict, fds: list[int] = ()) -> dict:
        """Run one task to its end; ``fds`` (run_entry's RPC pipes) are handed to the child and closed here."""
        lim = task["limits"]
        kind = task.get("kind", "program")
        fds = list(fds)
        self.set_cgroup_limits(int(lim["memory_mb"]), int(lim["max_procs"]))
        oom_before = self.oom_kills()
        kids: list[Kid] = []
        workdirs: list[str] = []
        t0 = time.monotonic()
        try:
            if kind == "check":
                kids = self._spawn_check(task, workdirs)
            elif kind == "entry":
                payload = {k: task.get(k) for k in ("entry", "payload", "max_message_bytes")}
                extra, fds = fds, []  # _spawn owns them now
                kids = [self._spawn("entry", payload, task, self.uid, extra, workdirs)]
            else:
                payload = {"code": task["code"], "files": task.get("files") or {}}
                kids = [self._spawn("program", payload, task, self.uid, [], workdirs, stdin=task.get("stdin"))]
            killed_by, waited = self._supervise(kind, task, kids, t0)
            duration = time.monotonic() - t0
            oom = self.oom_kills() > oom_before
            if kind == "check":
                return outcome.classify_check(task, kids[0], kids[1], killed_by, duration, oom)
            return {**outcome.classify(task, kids[0], killed_by, duration, oom, waited), "waited_s": waited}
        finally:
            for fd in fds:
                os.close(fd)
            for kid in kids:
                kid.kill()
                for fd in [*kid.readers.values(), kid.stdin_w, kid.pidfd]:
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            if self.own_pid_fd is None:
                self.kill_leftovers()
            for d in workdirs:
                import shutil

                shutil.rmtree(d, ignore_errors=True)  # fd-based, does not follow the task's symlinks

    # Fd ownership: ``_prepare`` takes ``extra`` only when it returns; ``_launch`` always consumes what it is given
    # (the template closes the child's ends once sent, ``_launch`` our ends if the fork fails).
    def _spawn_check(self, task: dict, workdirs: list[str]) -> list[Kid]:
        check = task["check"]
        req_r, req_w = os.pipe()  # T -> S: calls
        rep_r, rep_w = os.pipe()  # S -> T: replies
        ver_r, ver_w = os.pipe()  # T -> zygote: the verdict
        extras = [[req_r, rep_w], [req_w, rep_r, ver_w]]
        prepared: list[dict] = []
        try:
            prepared.append(self._prepare("solution", {"preamble": check["preamble"], "solution": check["solution"]},
                                          task, self.uid, extras[0], workdirs))
            tests = {k: check.get(k) for k in ("preamble", "tests", "remote", "imports")}
            prepared.append(self._prepare("tests", tests, task, self.uid_tests, extras[1], workdirs))
        except BaseException:
            self._discard(prepared)
            for fd in [fd for fds in extras[len(prepared):] for fd in fds] + [ver_r]:
                os.close(fd)
            raise
        try:
            kids = self._launch(prepared)
        except BaseException:
            os.close(ver_r)
            raise
        kids[1].readers["verdict"] = ver_r
        return kids

    def _spawn(self, role: str, payload: dict, task: dict, uid: int, extra: list[int], workdirs: list[str],
               stdin: str | None = None) -> Kid:
        try:
            prepared = self._prepare(role, payload, task, uid, extra, workdirs, stdin)
        except BaseException:
            for fd in extra:
                os.close(fd)
            raise
        return self._launch([prepared])[0]

    def _prepare(self, role: str, payload: dict, task: dict, uid: int, extra: list[int], workdirs: list[str],
                 stdin: str | None = None) -> dict:
        """A child's fork request and its pipes; its payload travels in a memfd the template never reads."""
        pipes = {name: os.pipe() for name in ("stdin", "stdout", "stderr", "meta", "setup")}
        memfd = os.memfd_create(f"spogw-{role}", os.MFD_CLOEXEC)
        req = {"role": role, "limits": task["limits"], "uid": uid, "probe": bool(task.get("probe")),
               "required": [k for k in ("seccomp", "private_tmp") if self.prot.get(k, "").startswith("active")]}
        try:
            wire.write_all(memfd, json.dumps(payload).encode())
            if not self.mount_ns and role != "tests":  # no private tmpfs: a directory of its own under the real /tmp
                import tempfile

                req["workdir"] = tempfile.mkdtemp(prefix="spogw-sbx-")
                workdirs.append(req["workdir"])
                if self.is_root:
                    os.chown(req["workdir"], uid, uid)
        except BaseException:
            for fd in (memfd, *(fd for pair in pipes.values() for fd in pair)):
                os.close(fd)
            raise
        child_fds = [pipes["stdin"][0], pipes["stdout"][1], pipes["stderr"][1], pipes["meta"][1], pipes["setup"][1],
                     memfd, *extra]
        ours = [pipes["stdin"][1], pipes["stdout"][0], pipes["stderr"][0], pipes["meta"][0], pipes["setup"][0]]
        return {"role": role, "req": req, "child_fds": child_fds, "ours": ours, "stdin": stdin}

    @staticmethod
    def _discard(prepared: list[dict]) -> None:
        for p in prepared:
            for fd in p["child_fds"] + p["ours"]:
                os.close(fd)

    def _launch(self, prepared: list[dict]) -> list[Kid]:
        """Fork the prepared children in one round trip with the template."""
        try:
            spawned = self.template.spawn([(p["req"], p["child_fds"]) for p in prepared])  # closes the child fds
        except BaseException:
            for p in prepared:
                for fd in p["ours"]:
                    os.close(fd)
            raise
        kids = []
        for p, (pid, pidfd) in zip(prepared, spawned, strict=True):
            stdin_w, out_r, err_r, meta_r, setup_r = p["ours"]
            data = (p["stdin"] or "").encode()
            if not data:
                os.close(stdin_w)
                stdin_w = -1
            else:
                os.set_blocking(stdin_w, False)
            readers = {"stdout": out_r, "stderr": err_r, "meta": meta_r, "setup": setup_r}
            kids.append(Kid(p["role"], pid, pidfd, readers, (stdin_w, data)))
        return kids

    def _supervise(self, kind: str, task: dict, kids: list[Kid], t0: float) -> tuple[str | None, float]:
        """Poll every channel of the task's children until it ends; returns why it was killed (or None) and how
        long its clock stood still (the parent answering its requests)."""
        lim = task["limits"]
        deadline = t0 + float(lim["wall_s"])
        max_wait = float(task.get("max_wait_s") or 0.0) if kind == "entry" else 0.0
        paused_since: float | None = None  # the parent is answering the child's requests: the deadline waits
        waited = 0.0  # finished pauses (the running one is now - paused_since); at most max_wait of it counts
        cap = int(lim["max_output_bytes"])
        judge = kids[-1]  # a program's or entry's only child; a check's tests
        readers = {fd: (kid, name) for kid in kids for name, fd in kid.readers.items()}
        writers = {kid.stdin_w: kid for kid in kids if kid.stdin_w >= 0}
        # The verdict is drained on every pass and at the end, not polled: a wake-up of the zygote per assert
        # would cost a context switch each (its pipe holds 1 MiB, ~100k asserts, between passes).
        verdict = judge.readers.get("verdict", -1)
        if verdict >= 0:
            os.set_blocking(verdict, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(verdict, fcntl.F_SETPIPE_SZ, 1 << 20)
        poller = select.poll()
        for fd in readers:
            if fd != verdict:
                poller.register(fd, select.POLLIN)
        for fd in writers:
            poller.register(fd, select.POLLOUT)
        poller.register(self.template.fileno(), select.POLLIN)
        if self.ctl is not None:
            poller.register(self.ctl.fileno(), select.POLLIN)
        killed_by = None
        while True:
            self._collect_exits(kids)
            if judge.status is not None:
                for kid in kids:
                    if kid.status is None:  # a check's solution: nothing left to answer; its exit is not awaited
                        kid.kill()
                        kid.abandoned = True
                        self.template.forget(kid.pid)
                break
            now = time.monotonic()
            stood = waited + (now - paused_since if paused_since is not None else 0.0)
            due = deadline + min(stood, max_wait)
            if now >= due:
                killed_by = "timeout"
                break
            left = 100 if paused_since is not None and stood < max_wait else int((due - now) * 1000) + 1
            for fd, ev in poller.poll(max(1, min(100, left))):
                if fd in readers:
                    kid, name = readers[fd]
                    data = os.read(fd, 65536)
                    if data:
                        kid.out[name] += data
                    else:
                        poller.unregister(fd)
                        del readers[fd]
                elif fd in writers:
                    if self._feed(writers[fd], ev):
                        poller.unregister(fd)
                        del writers[fd]
                elif fd == self.template.fileno():
                    self.template.pump()
                elif self.ctl is not None and fd == self.ctl.fileno():
                    op = self._control(task.get("tid"))
                    if op == "pause" and paused_since is None:
                        paused_since = time.monotonic()
                    elif op == "resume" and paused_since is not None:
                        waited, paused_since = waited + time.monotonic() - paused_since, None
                    elif op in ("cancelled", "parent_gone"):
                        killed_by = op
            if verdict >= 0:
                _drain(verdict, judge.out["verdict"], MAX_VERDICT + 1)
            if sum(len(k.out["stdout"]) + len(k.out["stderr"]) for k in kids) > cap:
                killed_by = "output"
            if any(len(k.out["meta"]) > 64 << 20 or len(k.out["verdict"]) > MAX_VERDICT for k in kids):
                killed_by = "output"
            if killed_by:
                break
        if paused_since is not None:  # it ended while the parent was still answering
            waited += time.monotonic() - paused_since
        waited = min(waited, max_wait)
        for kid in kids:
            kid.kill()
        end = time.monotonic() + 10.0
        while any(k.status is None and not k.abandoned for k in kids):
            self._collect_exits(kids)
            if all(k.status is not None or k.abandoned for k in kids) or time.monotonic() > end:
                break
            if select.select([self.template.fileno()], [], [], max(0.0, end - time.monotonic()))[0]:
                self.template.pump()
        for fd, (kid, name) in readers.items():  # drain what is left without blocking (the writers are dead)
            os.set_blocking(fd, False)
            _drain(fd, kid.out[name], MAX_VERDICT + 1 if name == "verdict" else cap + 65536)
        return killed_by, waited

    def _collect_exits(self, kids: list[Kid]) -> None:
        for kid in kids:
            if kid.status is None and kid.pid in self.template.exits:
                msg = self.template.exits.pop(kid.pid)
                kid.status, kid.cpu = int(msg["status"]), float(msg["cpu"])

    @staticmethod
    def _feed(kid: Kid, ev: int) -> bool:
        """Write more stdin; True when done (all written, or the reader is gone)."""
        if not ev & (select.POLLERR | select.POLLHUP):
            try:
                n = os.write(kid.stdin_w, kid.stdin_data[:65536])
            except BlockingIOError:
                n = 0
            except OSError:
                n, kid.stdin_data = 0, b""
            kid.stdin_data = kid.stdin_data[n:]
            if kid.stdin_data:
                return False
        os.close(kid.stdin_w)
        kid.stdin_w = -1
        return True

    def _control(self, tid=None) -> str | None:
        """A frame from the parent mid-task: ``cancelled``, ``pause``/``resume`` (of this entry's clock: ``tid``
        names the task, a late frame about an earlier one is dropped) or None; EOF means the parent is gone."""
        try:
            msg, fds = wire.recv(self.ctl)
        except (EOFError, OSError, ValueError):
            return "parent_gone"
        for fd in fds:
            os.close(fd)
        op = msg.get("op")
        if op == "cancel":
            return "cancelled"
        return op if op in ("pause", "resume") and tid is not None and msg.get("tid") == tid else None


def _drain(fd: int, buf: bytearray, cap: int) -> None:
    """Read what is there (non-blocking fd) into ``buf``, up to ``cap`` bytes in all."""
    with contextlib.suppress(BlockingIOError, OSError):
        while len(buf) < cap:
            data = os.read(fd, 65536)
            if not data:
                return
            buf += data
