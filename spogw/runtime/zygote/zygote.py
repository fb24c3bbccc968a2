"""The zygote: set up what all of a pool worker's tasks share, then run one task at a time and watch it.

Set-up, once (root; not root: a user namespace instead, see ``_enter_user_namespace``):
parent-death signal; a uid for untrusted children (``UID_BASE + pid``) and one for the tests of checks
(``UID_TESTS + pid``); memory and pids cgroups; an empty network namespace; a private mount namespace; the pid
namespace round trip; then the **template** (``template.py``), forked before any task is read, which builds the
children's minimal root (``rootfs.py``) and forks every child; finally one probe child through the full set-up.

Per task: ``task.py`` (``TaskRunner``, which this class extends).
"""

from __future__ import annotations

import contextlib
import os
import signal

from . import linux
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
from .task import TaskRunner

UID_BASE = 0x70000000  # untrusted children: UID_BASE + zygote pid, unique per live zygote, never a real account
UID_TESTS = 0x78000000  # the tests of a check: another uid, so a solution cannot signal or inspect its judge


class Zygote(TaskRunner):
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
