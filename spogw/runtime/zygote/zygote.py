"""The zygote: set up what all of a pool worker's tasks share, then run one task at a time and watch it.

Set-up, once (root; not root: a user namespace instead, see ``_enter_user_namespace``):
parent-death signal; a uid for untrusted children (``UID_BASE + pid``) and one for the tests of checks
(``UID_TESTS + pid``); memory and pids cgroups; an empty network namespace; a private mount namespace; the pid
namespace round trip; then the **template** (``template.py``), forked before any task is read, which builds the
children's minimal root (``rootfs.py``) and forks every child; finally one probe child through the full set-up.

Per task (a ``program``, an ``entry`` or a ``check``): write the payload into a memfd, ask the template for the
child(ren), then poll their stdout/stderr/meta/set-up (and the check's verdict) channels until the task ends, its
wall deadline passes, its output exceeds the cap, or the parent cancels it; kill what is left, collect the exit
reports, classify (``outcome.py``). A check is two children, S and T (``check.py``); it ends when T exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import time

from . import linux, outcome, wire
from .linux import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
)

UID_BASE = 0x70000000  # untrusted children: UID_BASE + zygote pid, unique per live zygote, never a real account
UID_TESTS = 0x78000000  # the tests of a check: another uid, so a solution cannot signal or inspect its judge
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


class Zygote:
    """Construct with the pool's options, ``setup()`` once, then ``run(task, fds)`` per task."""

    def __init__(self, options: dict, ctl=None, cgroup_root: str = "/sys/fs/cgroup"):
        self.hide = [str(p) for p in options.get("hide", [])]
        self.expose = [str(p) for p in options.get("expose", [])]
        self.site_packages = bool(options.get("site_packages", False))
        self.ctl = ctl  # the control socket to the parent (polled for cancel / EOF during a task)
        self.is_root = os.geteuid() == 0
        self.userns = False
        self.uid = UID_BASE + os.getpid() if self.is_root else os.getuid()
        self.uid_tests = UID_TESTS + os.getpid() if self.is_root else os.getuid()
        self.cgroup_root = cgroup_root
        self.cgroups: dict[str, str] = {}
        self.cgroup_fds: list[int] = []
        self.prot: dict[str, str] = {}
        self.host_net_fd: int | None = None
        self.own_pid_fd: int | None = None
        self.mount_ns = False
        self.minimal, self.bound = False, []
        self.template = None
        self._cg_limits: tuple | None = None

    # ------------------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from .template import Template

        prot = self.prot
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # the parent's death ends the zygote and its template
        if not self.is_root:
            self._enter_user_namespace()
            if self.userns:
                self._become_pid1()
        if self.is_root:
            prot["uid"] = (f"active: untrusted children run as uid/gid {self.uid}, the tests of a check as "
                           f"{self.uid_tests} (both unique to this zygote), no groups")
        elif self.userns:
            prot["uid"] = (f"partial: children keep uid {self.uid} (0 inside a user namespace) with every capability "
                           "dropped; they can write only their private tmpfs (everything else is read-only)")
        else:
            prot["uid"] = f"inactive: not root, children keep uid {self.uid}"
        self._setup_cgroups()
        if self.userns:  # joining the host network later needs privileges over it: give each task its own netns
            prot["net_namespace"] = "active: a fresh empty network namespace per task unless limits.network"
        else:
            try:
                self.host_net_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
                linux.unshare(CLONE_NEWNET)
                prot["net_namespace"] = "active: empty network namespace (loopback down) unless limits.network"
            except OSError as e:
                self.host_net_fd = None
                prot["net_namespace"] = f"inactive: {e}"
        try:
            linux.unshare(CLONE_NEWNS)
            linux.mount("none", "/", None, MS_REC | MS_PRIVATE)
            self.mount_ns = True
            prot["mount_namespace"] = "active: private to the zygote; each task gets its own (fresh tmpfs on /tmp)"
        except OSError as e:
            prot["mount_namespace"] = f"inactive: {e}"
        err = _try_in_child(_pidns_roundtrip)
        if err is None:
            self.own_pid_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
            prot["pid_namespace"] = "active: each task is pid 1 of its own pid namespace; its end kills all it forked"
        else:
            prot["pid_namespace"] = (f"inactive: {err}; the zygote kills what tasks leave behind (by uid and cgroup), "
                                     "its template (a subreaper) reaps them")
        self.template = Template(self)
        for fd in self.cgroup_fds:  # children are born in the cgroups: no per-child attach (v1's is slow: an RCU
            os.write(fd, str(self.template.pid).encode())  # grace period under the threadgroup lock, ms at times)
        view = self.template.view
        self.minimal, self.bound = bool(view.get("minimal")), list(view.get("bound") or [])
        prot["root"] = view["root"]
        prot["template"] = "active: children are forked by a process that never held any task's data"
        self._probe_child()

    def _enter_user_namespace(self) -> None:
        """Not root: map our uid to 0 in a new user namespace, which allows the mount, pid, net and IPC namespaces
        below (where unprivileged user namespaces are enabled)."""
        uid, gid = os.getuid(), os.getgid()
        try:
            linux.unshare(CLONE_NEWUSER)
            linux.write_file("/proc/self/setgroups", "deny")
            linux.write_file("/proc/self/uid_map", f"0 {uid} 1")
            linux.write_file("/proc/self/gid_map", f"0 {gid} 1")
            self.userns = True
            self.prot["user_namespace"] = f"active: uid {uid} mapped to 0 in a private user namespace"
        except OSError as e:
            self.prot["user_namespace"] = f"inactive: {e}"

    def _become_pid1(self) -> None:
        """In a user namespace, setns() back to the original pid namespace is refused (the initial user namespace
        owns it), so the per-task unshare/setns round trip needs a pid namespace our user namespace owns: the
        zygote forks itself as pid 1 of one. The outer process only waits and passes on the exit code."""
        try:
            linux.unshare(CLONE_NEWPID)
        except OSError:
            return
        pid = os.fork()
        if pid:
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
            os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        with contextlib.suppress(OSError):  # our own /proc, so that /proc/self/ns/pid is the new namespace
            linux.unshare(CLONE_NEWNS)
            linux.mount("none", "/", None, MS_REC | MS_PRIVATE)
            linux.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def _setup_cgroups(self) -> None:
        if not self.is_root:
            self.prot["cgroup"] = "inactive: not root"
            return
        for ctl in ("memory", "pids"):
            base = os.path.join(self.cgroup_root, ctl, "spogw-sandbox")
            try:
                os.makedirs(base, exist_ok=True)
                _sweep_dead_groups(base)
                path = os.path.join(base, f"z{os.getpid()}")
                os.makedirs(path, exist_ok=True)
                self.cgroup_fds.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY))
                self.cgroups[ctl] = path
            except OSError as e:
                self.prot[f"cgroup_{ctl}"] = f"inactive: {e}"
        if "memory" in self.cgroups:
            self.prot["cgroup_memory"] = "active: memory.limit_in_bytes = limits.memory_mb for the task's processes"
        if "pids" in self.cgroups:
            self.prot["cgroup_pids"] = "active: pids.max = limits.max_procs (+ 1 for the template, which forks there)"

    def _probe_child(self) -> None:
        """Fork one child through the full per-task set-up with a trivial program; record what worked."""
        res = self.run({"kind": "program", "code": "pass", "probe": True,
                        "limits": {"wall_s": 10, "cpu_s": 10, "memory_mb": 256, "max_procs": 8, "file_size_mb": 1,
                                   "network": False, "max_output_bytes": 4096}})
        for line in res.get("probe", []):
            k, _, v = line.partition("=")
            self.prot[k] = v
        if res["status"] != "ok":
            self.prot["probe"] = f"failed: {res['status']}: {res['reason']} {res['stderr'][-500:]}"

    # ----------------------------------------------------------------------------------------------- per task
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
            killed_by = self._supervise(kind, task, kids, t0)
            duration = time.monotonic() - t0
            oom = self.oom_kills() > oom_before
            if kind == "check":
                return outcome.classify_check(task, kids[0], kids[1], killed_by, duration, oom)
            return outcome.classify(task, kids[0], killed_by, duration, oom)
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

    def _supervise(self, kind: str, task: dict, kids: list[Kid], t0: float) -> str | None:
        """Poll every channel of the task's children until it ends; returns why it was killed (or None)."""
        lim = task["limits"]
        deadline = t0 + float(lim["wall_s"])
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
            if now >= deadline:
                killed_by = "timeout"
                break
            for fd, ev in poller.poll(max(1, min(100, int((deadline - now) * 1000) + 1))):
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
                    killed_by = self._control()
            if verdict >= 0:
                _drain(verdict, judge.out["verdict"], MAX_VERDICT + 1)
            if sum(len(k.out["stdout"]) + len(k.out["stderr"]) for k in kids) > cap:
                killed_by = "output"
            if any(len(k.out["meta"]) > 64 << 20 or len(k.out["verdict"]) > MAX_VERDICT for k in kids):
                killed_by = "output"
            if killed_by:
                break
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
        return killed_by

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

    def _control(self) -> str | None:
        """A frame from the parent mid-task: a cancel; EOF means the parent is gone."""
        try:
            msg, fds = wire.recv(self.ctl)
        except (EOFError, OSError, ValueError):
            return "parent_gone"
        for fd in fds:
            os.close(fd)
        return "cancelled" if msg.get("op") == "cancel" else None

    def template_alive(self) -> bool:
        try:
            return os.waitpid(self.template.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    # -------------------------------------------------------------------------------------------- resources
    def set_cgroup_limits(self, memory_mb: int, max_procs: int) -> None:
        if self._cg_limits == (memory_mb, max_procs):
            return
        self._cg_limits = None  # unknown until both writes went through
        if "memory" in self.cgroups:
            linux.write_file(os.path.join(self.cgroups["memory"], "memory.limit_in_bytes"), str(memory_mb << 20))
        if "pids" in self.cgroups:  # + 1: the template lives in the group too
            linux.write_file(os.path.join(self.cgroups["pids"], "pids.max"), str(max_procs + 1))
        self._cg_limits = (memory_mb, max_procs)

    def oom_kills(self) -> int:
        """Count of OOM kills in our memory cgroup (v1 oom_control 'oom_kill N')."""
        if "memory" not in self.cgroups:
            return 0
        try:
            with open(os.path.join(self.cgroups["memory"], "memory.oom_control")) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def kill_leftovers(self) -> None:
        """Without a pid namespace: kill every process in our pids cgroup or of our sandbox uids."""
        pids: set[int] = set()
        if "pids" in self.cgroups:
            with contextlib.suppress(OSError), open(os.path.join(self.cgroups["pids"], "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        if self.is_root:
            for name in os.listdir("/proc"):
                if name.isdigit():
                    with contextlib.suppress(OSError):
                        if os.stat(f"/proc/{name}").st_uid in (self.uid, self.uid_tests):
                            pids.add(int(name))
        if self.template is not None:
            pids.discard(self.template.pid)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """End the template (and so every child), kill leftovers, remove our cgroups."""
        if self.template is not None:
            self.template.close()
        self.kill_leftovers()
        for path in self.cgroups.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)
            with contextlib.suppress(OSError):
                _sweep_dead_groups(os.path.dirname(path))


def _drain(fd: int, buf: bytearray, cap: int) -> None:
    """Read what is there (non-blocking fd) into ``buf``, up to ``cap`` bytes in all."""
    with contextlib.suppress(BlockingIOError, OSError):
        while len(buf) < cap:
            data = os.read(fd, 65536)
            if not data:
                return
            buf += data


def _sweep_dead_groups(base: str) -> None:
    """Remove the cgroups of zygotes that died without cleaning up (SIGKILL); rmdir refuses non-empty groups."""
    for name in os.listdir(base):
        if name.startswith("z") and name[1:].isdigit() and not os.path.exists(f"/proc/{name[1:]}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, name))


def _pidns_roundtrip() -> None:
    fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
    linux.unshare(CLONE_NEWPID)
    linux.setns(fd, CLONE_NEWPID)


def _try_in_child(fn) -> str | None:
    """Run fn in a throwaway child (so a half-done namespace change cannot stick to us); None if it worked."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            os._exit(0)
        except BaseException as e:  # noqa: B036
            os.write(w, repr(e).encode()[:500])
            os._exit(1)
    os.close(w)
    msg = os.read(r, 600).decode(errors="replace")
    os.close(r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return None if code == 0 else (msg or f"exit {code}")
