"""The sandbox's trusted half: a small "zygote" process that forks one isolated child per task.

Why a zygote: the parent (trainer, scorer) is a big multi-threaded process; forking it per program is unsafe and
slow, and starting an interpreter per program costs ~20 ms. The zygote is started once (stdlib only, runs as the
parent's user), pre-imports what generated programs usually import, and then per task:

    zygote (root, private no-network netns, private read-only mount ns)
      └─ unshare(PID) + fork ─> G: pid 1 of a fresh pid namespace
             G (still root): new mount + IPC ns, fresh tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock,
                 joins the zygote's memory/pids cgroups, oom_score_adj=1000, rlimits,
             then setgroups([]) / setgid / setuid to a uid unique to this zygote, no_new_privs,
                 parent-death signal, seccomp filter, audit hook (record only) -> runs the untrusted code.

When G exits or is killed, the kernel kills every process left in its pid namespace (escaped fork bombs
included) and the tmpfs mounts vanish with the mount namespace. Each step is probed once at start-up; a step that
the machine does not allow is skipped and reported (``protections``), a step that worked in the probe but fails
for a task fails that task closed ("sandbox_error").

This file must import nothing outside the stdlib: it is also run as a script (``python -I _sandbox_child.py``).
Protocol with the parent: frames of 4-byte big-endian length + UTF-8 JSON on the zygote's stdin/stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import struct
import sys
import time

# ----------------------------------------------------------------------------------------------------------- framing

MAX_CONTROL_FRAME = 256 << 20


def read_exact(fd: int, n: int) -> bytes:
    """Read exactly n bytes from fd, or raise EOFError (peer gone)."""
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("pipe closed")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def read_frame(fd: int, cap: int = MAX_CONTROL_FRAME) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    if n > cap:
        raise ValueError(f"frame of {n} bytes exceeds the cap of {cap}")
    return json.loads(read_exact(fd, n))


def write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------------------------------------------- linux helpers

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUTS = 0x00020000, 0x08000000, 0x04000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_DUMPABLE = 1, 38, 22, 4
PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 24, 47, 4
UID_BASE = 0x70000000  # sandbox uids: UID_BASE + zygote pid, unique per live zygote, never a real account
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                    data.encode() if data else None),
        f"mount {target}",
    )


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


# ----------------------------------------------------------------------------------------------------------- seccomp
# A hand-written BPF filter (no libseccomp needed). x86_64 only: elsewhere the probe reports seccomp inactive.
_AUDIT_ARCH_X86_64 = 0xC000003E
_DENY_X86_64 = {  # syscalls a generated program never needs and that widen the kernel attack surface
    "ptrace": 101, "syslog": 103, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "pivot_root": 155, "chroot": 161, "acct": 163, "settimeofday": 164, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
_NR_SOCKET, _NR_CLONE, _NR_CLONE3 = 41, 56, 435
_NS_FLAGS = 0x7E020080  # every CLONE_NEW* flag (incl. CLONE_NEWTIME)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program(network: bool) -> bytes:
    """BPF: kill foreign-arch calls; EPERM for _DENY_X86_64 and namespace-creating clone; ENOSYS for clone3 (libc
    falls back to clone, whose flags we can inspect); EACCES for AF_INET/AF_INET6/AF_PACKET sockets unless network."""
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    eperm, allow = 0x00050000 | errno.EPERM, 0x7FFF0000
    prog = [_bpf(ld, 4), _bpf(jeq, _AUDIT_ARCH_X86_64, 1, 0), _bpf(ret, 0x80000000), _bpf(ld, 0),
            _bpf(jge, 0x40000000, 0, 1), _bpf(ret, eperm)]  # x32 ABI numbers: refused
    for nr in _DENY_X86_64.values():
        prog += [_bpf(jeq, nr, 0, 1), _bpf(ret, eperm)]
    prog += [_bpf(jeq, _NR_CLONE3, 0, 1), _bpf(ret, 0x00050000 | errno.ENOSYS)]
    if not network:
        prog += [_bpf(jeq, _NR_SOCKET, 0, 6), _bpf(ld, 16), _bpf(jeq, 2, 3, 0), _bpf(jeq, 10, 2, 0),
                 _bpf(jeq, 17, 1, 0), _bpf(ret, allow), _bpf(ret, 0x00050000 | errno.EACCES)]
    prog += [_bpf(jeq, _NR_CLONE, 0, 4), _bpf(ld, 16), _bpf(jset, _NS_FLAGS, 0, 1), _bpf(ret, eperm),
             _bpf(ret, allow), _bpf(ret, allow)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(network: bool) -> None:
    prog = seccomp_program(network)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp")


# ----------------------------------------------------------------------------------------------------- audit (record)
AUDITED = frozenset({
    "os.system", "subprocess.Popen", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "socket.connect", "socket.bind", "socket.sendto", "os.kill", "os.killpg", "ctypes.dlopen", "os.setuid",
    "shutil.rmtree", "socket.__new__",
})


def _install_audit_hook(meta_fd: int, limit: int = 16) -> None:
    """Record (never block) notable events: a Python audit hook is no security boundary (ctypes escapes it), but it
    tells the stage *why* a program failed, e.g. "socket.connect ('127.0.0.1', 8080)" before EACCES."""
    count = [0]

    def hook(event: str, args: tuple) -> None:
        if event in AUDITED and count[0] < limit:
            count[0] += 1
            try:
                line = json.dumps({"event": event, "args": repr(args)[:200]}) + "\n"
                os.write(meta_fd, line.encode())
            except Exception:
                pass

    sys.addaudithook(hook)


# -------------------------------------------------------------------------------------------------------- the zygote


def _read_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


class Zygote:
    """Forks isolated children; one task at a time. Construct, then ``probe()`` once, then ``run(task)``."""

    def __init__(self, hide: list[str] = (), cgroup_root: str = "/sys/fs/cgroup"):
        self.hide = list(hide)
        self.is_root = os.geteuid() == 0  # real root: a uid of its own per zygote, cgroups
        self.userns = False  # not root: a user namespace gives the namespaces, children drop every capability
        self.uid = UID_BASE + os.getpid() if self.is_root else os.getuid()
        self.gid = self.uid if self.is_root else os.getgid()
        self.cgroup_root = cgroup_root
        self.cgroups: dict[str, str] = {}
        self.prot: dict[str, str] = {}
        self.host_net_fd: int | None = None
        self.own_pid_fd: int | None = None
        self._cg_limits: tuple | None = None

    # -- start-up: things done once in the zygote itself
    def setup(self) -> None:
        prot = self.prot
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the parent's death ends the zygote, whose death ends the children
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a task come back to us (reaped, killed), not to init
        if not self.is_root:
            self._enter_user_namespace()
            if self.userns:
                self._become_pid1()
        if self.is_root:
            prot["uid"] = f"active: children run as uid/gid {self.uid} (unique to this zygote), no groups"
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
                unshare(CLONE_NEWNET)
                prot["net_namespace"] = "active: empty network namespace (loopback down) unless limits.network"
            except OSError as e:
                self.host_net_fd = None
                prot["net_namespace"] = f"inactive: {e}"
        try:
            unshare(CLONE_NEWNS)
            mount("none", "/", None, MS_REC | MS_PRIVATE)
            exposed = self._expose_interpreter() if self.is_root else []
            exposed += self._hide_paths()
            self._remount_readonly()
            prot["mount_namespace"] = ("active: every mount read-only except /proc and /sys; fresh tmpfs per task on "
                                       + ", ".join(d for d in WRITABLE_DIRS if os.path.isdir(d))
                                       + (f"; {', '.join(exposed)}" if exposed else ""))
        except OSError as e:
            prot["mount_namespace"] = f"inactive: {e}"
        err = _try_in_child(_pidns_roundtrip)
        if err is None:
            self.own_pid_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
            prot["pid_namespace"] = "active: each task is pid 1 of its own pid namespace; its end kills all it forked"
        else:
            prot["pid_namespace"] = (f"inactive: {err}; the zygote (a subreaper) kills and reaps what tasks leave "
                                     "behind instead")
        self._probe_child()

    def _enter_user_namespace(self) -> None:
        """Not root: map our uid to 0 in a new user namespace, which allows the mount, pid, net and IPC namespaces
        below (where unprivileged user namespaces are enabled)."""
        uid, gid = os.getuid(), os.getgid()
        try:
            unshare(CLONE_NEWUSER)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
            self.userns = True
            self.prot["user_namespace"] = f"active: uid {uid} mapped to 0 in a private user namespace"
        except OSError as e:
            self.prot["user_namespace"] = f"inactive: {e}"

    def _become_pid1(self) -> None:
        """In a user namespace, setns() back to the original pid namespace is refused (the initial user namespace
        owns it), so the per-task unshare/setns round trip needs a pid namespace our user namespace owns: the
        zygote forks itself as pid 1 of one. The outer process only waits and passes on the exit code."""
        try:
            unshare(CLONE_NEWPID)
        except OSError:
            return
        pid = os.fork()
        if pid:
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
            os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        with contextlib.suppress(OSError):  # our own /proc, so that /proc/self/ns/pid is the new namespace
            unshare(CLONE_NEWNS)
            mount("none", "/", None, MS_REC | MS_PRIVATE)
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

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
                self.cgroups[ctl] = path
            except OSError as e:
                self.prot[f"cgroup_{ctl}"] = f"inactive: {e}"
        if "memory" in self.cgroups:
            self.prot["cgroup_memory"] = "active: memory.limit_in_bytes = limits.memory_mb for the task's processes"
        if "pids" in self.cgroups:
            self.prot["cgroup_pids"] = "active: pids.max = limits.max_procs"

    def _expose_interpreter(self) -> list[str]:
        """Make the interpreter, its stdlib and sys.path reachable for the sandbox uid.

        Why: the interpreter may live under a directory the sandbox uid cannot traverse (here /root, mode 700, holds
        pyenv). For each such directory B: keep an O_PATH fd on every needed tree under it, cover B with an empty
        0755 tmpfs (which also hides the rest of B: root's home, caches, credentials), and bind each tree back
        through /proc/self/fd (the fd still reaches the covered original)."""
        needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix,
                                                os.path.dirname(sys.executable), *sys.path) if p and os.path.isdir(p)}
        blocked: dict[str, set[str]] = {}
        for path in sorted(needed):
            parts = path.split("/")
            for i in range(2, len(parts) + 1):
                anc = "/".join(parts[:i])
                if not os.stat(anc).st_mode & 0o001:
                    blocked.setdefault(anc, set()).add(path)
                    break
        notes = []
        for base, paths in blocked.items():
            keep = [p for p in sorted(paths) if not any(p.startswith(q + "/") for q in paths)]
            if base in keep:  # a needed tree is itself closed to others: nothing sensible to expose
                notes.append(f"{base} stays unreadable for the sandbox uid")
                continue
            fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in keep]
            mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for p, fd in fds:
                os.makedirs(p, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
                os.close(fd)
            notes.append(f"{base} hidden except {', '.join(keep)}")
        return notes

    def _hide_paths(self) -> list[str]:
        """Cover data the programs must not read (benchmark ground truth: a generated workflow that reads the test
        answers would be a reward hack) with an empty read-only tmpfs, or /dev/null for a file."""
        hidden = []
        for path in self.hide:
            path = os.path.realpath(path)
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0555")
            elif os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)
            else:
                continue
            hidden.append(path)
        return [f"hidden: {', '.join(hidden)}"] if hidden else []

    def _remount_readonly(self) -> None:
        for target in sorted(set(_read_mounts())):
            if target.startswith(("/proc", "/sys")):
                continue  # /sys/fs/cgroup must stay writable for root to join cgroups; both are root-only anyway
            st = os.statvfs(target) if os.path.exists(target) else None
            if st is None:
                continue
            keep = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)  # ST_* == MS_* for these bits
            with contextlib.suppress(OSError):  # e.g. a mount hidden under another: the uid cannot write there anyway
                mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)

    def set_cgroup_limits(self, memory_mb: int, max_procs: int) -> None:
        if self._cg_limits == (memory_mb, max_procs):
            return
        self._cg_limits = None  # unknown until both writes went through
        if "memory" in self.cgroups:
            _write(os.path.join(self.cgroups["memory"], "memory.limit_in_bytes"), str(memory_mb << 20))
        if "pids" in self.cgroups:
            _write(os.path.join(self.cgroups["pids"], "pids.max"), str(max_procs))
        self._cg_limits = (memory_mb, max_procs)

    def oom_kills(self) -> int:
        """Count of OOM kills in our memory cgroup (v1 oom_control 'oom_kill N'; failcnt as fallback)."""
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

    def cleanup(self) -> None:
        """Kill whatever the pid namespace did not take down (only needed when it is inactive), remove cgroups."""
        self.kill_leftovers()
        for path in self.cgroups.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)
            with contextlib.suppress(OSError):
                _sweep_dead_groups(os.path.dirname(path))

    def kill_leftovers(self) -> None:
        pids: set[int] = set()
        if "pids" in self.cgroups:
            try:
                with open(os.path.join(self.cgroups["pids"], "cgroup.procs")) as f:
                    pids.update(int(x) for x in f.read().split())
            except OSError:
                pass
        if self.is_root and self.own_pid_fd is None:  # no pid namespace: sweep the sandbox uid
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        if os.stat(f"/proc/{name}").st_uid == self.uid:
                            pids.add(int(name))
                    except OSError:
                        pass
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def reap_descendants(self) -> None:
        """Kill and reap every process left as our child: as subreaper we adopt whatever a task left behind when
        no pid namespace took it down (setsid + double fork included). Fast path: no child at all."""
        for _ in range(1000):
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                return
            me = str(os.getpid())
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        with open(f"/proc/{name}/stat") as f:
                            if f.read().rsplit(")", 1)[1].split()[1] == me:
                                os.kill(int(name), signal.SIGKILL)
                    except (OSError, IndexError):
                        pass
            time.sleep(0.002)

    def _probe_child(self) -> None:
        """Fork one child through the full per-task setup with a trivial program; record what worked."""
        res = self.run({"code": "pass", "limits": {"wall_s": 10, "cpu_s": 10, "memory_mb": 256, "max_procs": 8,
                                                    "file_size_mb": 1, "network": False, "max_output_bytes": 4096},
                        "probe": True})
        for line in res.get("probe", []):
            k, _, v = line.partition("=")
            self.prot[k] = v
        if res["status"] != "ok":
            self.prot["probe"] = f"failed: {res['status']}: {res['reason']} {res['stderr'][-500:]}"

    # -- per task
    def run(self, task: dict) -> dict:
        lim = task["limits"]
        self.set_cgroup_limits(int(lim["memory_mb"]), int(lim["max_procs"]))
        oom_before = self.oom_kills()
        workdir = None
        if not self.prot.get("mount_namespace", "").startswith("active"):  # no private tmpfs: a directory of its own
            import tempfile

            workdir = task["_workdir"] = tempfile.mkdtemp(prefix="spogw-sbx-")
            if self.is_root:
                os.chown(workdir, self.uid, self.gid)
        fds = {name: os.pipe() for name in ("stdin", "stdout", "stderr", "meta", "setup")}
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            if self.own_pid_fd is not None:
                unshare(CLONE_NEWPID)
            try:
                t0 = time.monotonic()
                pid = os.fork()
                if pid == 0:  # ------------------------------------------------------------------ child G
                    try:
                        _child(self, task, fds)
                    finally:
                        os._exit(111)
            finally:
                if self.own_pid_fd is not None:  # (the child never gets here: it ends in os._exit)
                    setns(self.own_pid_fd, CLONE_NEWPID)  # so the next unshare(CLONE_NEWPID) is allowed
        except BaseException:  # no child: the long-lived zygote must not leak the task's pipes
            for r, w in fds.values():
                os.close(r)
                os.close(w)
            raise
        for name, (r, w) in fds.items():
            os.close(w if name != "stdin" else r)
        try:
            return self._supervise(pid, task, fds, t0, oom_before)
        finally:
            if workdir:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)  # fd-based, does not follow the task's symlinks

    def _supervise(self, pid: int, task: dict, fds: dict, t0: float, oom_before: int) -> dict:
        lim = task["limits"]
        deadline = t0 + float(lim["wall_s"])
        cap = int(lim["max_output_bytes"])
        out = {"stdout": bytearray(), "stderr": bytearray(), "meta": bytearray(), "setup": bytearray()}
        readers = {fds[k][0]: k for k in out}
        stdin_w = fds["stdin"][1]
        stdin_data = (task.get("stdin") or "").encode()
        if not stdin_data:
            os.close(stdin_w)
            stdin_w = -1
        else:
            os.set_blocking(stdin_w, False)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1
        poller = select.poll()
        for fd in readers:
            poller.register(fd, select.POLLIN)
        if stdin_w >= 0:
            poller.register(stdin_w, select.POLLOUT)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        poller.register(0, select.POLLIN)  # control pipe: EOF means the parent is gone
        killed_by, status_word = None, None
        while True:
            now = time.monotonic()
            if now >= deadline:
                killed_by = "timeout"
                break
            events = poller.poll(max(1, min(100 if pidfd >= 0 else 5, int((deadline - now) * 1000) + 1)))
            for fd, ev in events:
                if fd in readers:
                    data = os.read(fd, 65536)
                    if data:
                        kind = readers[fd]
                        out[kind] += data
                    else:
                        poller.unregister(fd)
                        del readers[fd]
                elif fd == stdin_w:
                    if ev & (select.POLLERR | select.POLLHUP):
                        poller.unregister(fd)
                        os.close(fd)
                        stdin_w = -1
                        continue
                    try:
                        n = os.write(fd, stdin_data[:65536])
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        n, stdin_data = 0, b""
                    stdin_data = stdin_data[n:]
                    if not stdin_data:
                        poller.unregister(fd)
                        os.close(fd)
                        stdin_w = -1
                elif fd == 0:
                    killed_by = "parent_gone"
            if len(out["stdout"]) + len(out["stderr"]) > cap:
                killed_by = "output"
            if len(out["meta"]) > 64 << 20:
                killed_by = "output"
            if killed_by:
                break
            got, st, rusage = os.wait4(pid, os.WNOHANG)
            if got:
                status_word = st
                break
        if killed_by:
            _kill(pid)
        if status_word is None:
            _, status_word, rusage = os.wait4(pid, 0)
        duration = time.monotonic() - t0
        if self.own_pid_fd is None:
            self.kill_leftovers()
        self.reap_descendants()
        for fd in readers:  # drain what is left without blocking (writers are dead or being killed)
            os.set_blocking(fd, False)
            try:
                while len(out[readers[fd]]) <= cap + 65536:
                    data = os.read(fd, 65536)
                    if not data:
                        break
                    out[readers[fd]] += data
            except BlockingIOError:
                pass
        for fd in list(readers) + [x for x in (stdin_w, pidfd) if x >= 0]:
            os.close(fd)
        cpu = _child_cpu(rusage)
        return _classify(task, status_word, killed_by, out, duration, cpu, self.oom_kills() > oom_before)


def _sweep_dead_groups(base: str) -> None:
    """Remove the cgroups of zygotes that died without cleaning up (SIGKILL); rmdir refuses non-empty groups."""
    for name in os.listdir(base):
        if name.startswith("z") and name[1:].isdigit() and not os.path.exists(f"/proc/{name[1:]}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, name))


def _pidns_roundtrip() -> None:
    fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
    unshare(CLONE_NEWPID)
    setns(fd, CLONE_NEWPID)


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


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kill(pid: int) -> None:
    for target in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
        with contextlib.suppress(OSError):
            target()


def _child_cpu(rusage) -> float:
    if rusage is None:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime  # cumulative; only used as a lower bound hint
    return rusage.ru_utime + rusage.ru_stime


_CRASH = {signal.SIGSEGV: "segmentation fault", signal.SIGBUS: "bus error", signal.SIGILL: "illegal instruction",
          signal.SIGFPE: "floating point exception", signal.SIGABRT: "abort"}


def _classify(task: dict, st: int, killed_by: str | None, out: dict, duration: float, cpu: float, oom: bool) -> dict:
    """Turn a wait status plus what the child reported into (status, reason). See sandbox.STATUSES."""
    lim = task["limits"]
    meta, events, value, has_value, exc, _ = _parse_meta(bytes(out["meta"]))
    setup = _parse_setup(bytes(out["setup"]))
    probe = setup.get("probe") or []
    rc = os.waitstatus_to_exitcode(st)
    if not setup.get("ok"):
        status = "sandbox_error"
        reason = setup.get("msg") or f"sandbox set-up did not complete (wait status {st}, {killed_by or 'exited'})"
    elif killed_by == "timeout":
        status, reason = "timeout", f"wall time {lim['wall_s']:g} s exceeded; process group killed"
    elif killed_by == "output":
        status, reason = "output", f"output exceeded {lim['max_output_bytes']} bytes; process group killed"
    elif killed_by == "parent_gone":
        status, reason = "killed", "the parent closed the control pipe; child killed"
    elif os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= float(lim["cpu_s"]) - 0.05):
            status, reason = "timeout", f"CPU time {lim['cpu_s']:g} s exceeded (killed by {name})"
        elif sig == signal.SIGKILL and oom:
            status, reason = "memory", f"memory limit {lim['memory_mb']} MB exceeded; killed by the cgroup OOM killer"
        elif sig in _CRASH:
            status, reason = "crash", f"killed by {name} ({_CRASH[sig]})"
        else:
            status, reason = "killed", f"killed by signal {name}"
    elif exc is not None:
        kind = exc.get("type", "?")
        msg = f"{kind}: {exc.get('msg', '')}".strip()
        if kind == "SystemExit":
            status, reason = ("ok", "sys.exit(0)") if rc == 0 and not task.get("entry") else (
                "exit", f"sys.exit({exc.get('code')!r}) called")
        elif kind == "MemoryError":
            status, reason = "memory", f"{msg} (memory limit {lim['memory_mb']} MB)"
        else:
            status, reason = "error", msg
    elif rc == 0:
        if task.get("entry") and not has_value:
            status, reason = "exit", "the entry function's process exited before returning"
        else:
            status, reason = "ok", ""
    else:
        status, reason = "exit", f"exited with code {rc}"
    if oom and status not in ("memory",):
        reason += f" (the cgroup OOM killer fired: memory limit {lim['memory_mb']} MB)"
    cap = int(lim["max_output_bytes"])
    res = {
        "status": status, "returncode": rc, "reason": reason, "duration_s": duration, "cpu_s": cpu,
        "stdout": bytes(out["stdout"][:cap]).decode("utf-8", "replace"),
        "stderr": bytes(out["stderr"][:cap]).decode("utf-8", "replace"),
        "value": value, "events": events,
    }
    if probe:
        res["probe"] = [str(x) for x in probe]
    return res


def _parse_setup(raw: bytes) -> dict:
    try:
        rec = json.loads(raw.split(b"\n", 1)[0])
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}


def _parse_meta(raw: bytes) -> tuple:
    """Parse the child's meta channel defensively: it is written by untrusted code too (garbage lines ignored)."""
    events, value, has_value, exc = [], None, False, None
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "event" in rec and len(events) < 32:
            events.append(f"{rec.get('event')} {rec.get('args', '')}"[:240])
        elif "value" in rec:
            value, has_value = rec["value"], True
        elif "exc" in rec and isinstance(rec["exc"], dict):
            exc = rec["exc"]
    return None, events, value, has_value, exc, None


# ------------------------------------------------------------------------------------------------------- the child G


class SandboxSetupError(Exception):
    pass


def _child(z: Zygote, task: dict, fds: dict) -> None:
    """Runs in the forked child: isolate, drop privileges, run the task. Never returns."""
    probe: list[str] = []
    try:
        _isolate(z, task, fds, probe)
    except BaseException as e:  # fail closed: never run untrusted code half-isolated
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"sandbox setup: {e!r} in {where.name}() line {where.lineno}"
        _meta(task.get("_setup_fd", fds["setup"][1]), {"ok": False, "msg": msg})
        os._exit(112)
    # The set-up channel is closed before any untrusted code runs: what arrives on it is the sandbox's own word
    # (the meta channel can be written by the program too, so a failure there can never pose as sandbox_error).
    _meta(task["_setup_fd"], {"ok": True, "probe": probe})
    os.close(task["_setup_fd"])
    _execute(task, 3)



def _isolate(z: Zygote, task: dict, fds: dict, probe: list[str]) -> None:
    lim = task["limits"]
    is_probe = task.get("probe", False)
    prot = z.prot
    os.setsid()
    private = False
    user_procs = 0 if z.is_root else _count_user_procs(os.getuid())  # before /proc is replaced
    with contextlib.suppress(OSError):
        _write("/proc/self/oom_score_adj", "1000")  # under memory pressure the kernel picks sandboxes first
    if z.is_root or z.userns:  # namespace and cgroup steps first: they use the zygote's fds (the dup2s reuse them)
        for path in z.cgroups.values():
            _write(os.path.join(path, "cgroup.procs"), "0")
        if lim.get("network") and z.host_net_fd is not None:
            setns(z.host_net_fd, CLONE_NEWNET)
        if z.userns and not lim.get("network"):
            unshare(CLONE_NEWNET)
        private = _private_dirs(z, lim, probe if is_probe else None)
    # stdio: the task's pipes on 0/1/2, meta on 3, rpc on 4/5 when given; everything else closed. Sources are
    # first copied above every target so that no dup2 clobbers a source still to be moved.
    rpc = task.get("rpc")
    sources = [fds["stdin"][0], fds["stdout"][1], fds["stderr"][1], fds["meta"][1]] + (list(rpc) if rpc else [])
    sources.append(fds["setup"][1])
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 8) for fd in sources]  # free fds above every target
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(high), 1 << 16)
    task["_setup_fd"] = len(high) - 1
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not private and "_workdir" not in task:
        raise SandboxSetupError("no private working directory: the per-task tmpfs could not be mounted")
    home = "/tmp/work" if private else task["_workdir"]  # else: made (and removed) by the zygote
    _set_rlimits(lim, z.is_root, user_procs, probe if is_probe else None)
    if z.is_root:
        os.setgroups([])
        os.setgid(z.gid)
        os.setuid(z.uid)
    elif z.userns:
        _drop_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: changing credentials clears it
    if is_probe:
        probe.append("no_new_privs=active: setuid binaries cannot regain privileges")
    os.chdir(home)
    os.umask(0o077)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                       "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        if os.uname().machine != "x86_64":
            raise OSError(errno.ENOSYS, f"no BPF filter written for {os.uname().machine}")
        install_seccomp(bool(lim.get("network")))
        if is_probe:
            probe.append("seccomp=active: BPF filter refuses ptrace, mount, unshare/setns, namespace clone, bpf, "
                         "keyctl, io_uring, ... and (without network) AF_INET/AF_INET6/AF_PACKET sockets")
    except OSError as e:
        if is_probe:
            probe.append(f"seccomp=inactive: {e}")
        elif prot.get("seccomp", "").startswith("active"):
            raise
    _install_audit_hook(3)
    if is_probe:
        probe.append("audit_hook=record-only: os.system, subprocess, fork, exec, socket.connect/bind, os.kill, "
                     "ctypes.dlopen are reported in result.events")
    for name, text in (task.get("files") or {}).items():
        if os.path.isabs(name) or ".." in name.split("/"):
            raise SandboxSetupError(f"files: {name!r} must be a relative path inside the working directory")
        if os.path.dirname(name):
            os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "w") as f:
            f.write(text)


def _code_trees() -> list[str]:
    """The trees a sandboxed Python needs: the interpreter, sys.path, and the project holding this file.

    An editable install (or a CI checkout) can live under /tmp; the fresh tmpfs on /tmp would hide it."""
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix,
                                            os.path.dirname(sys.executable), *sys.path, project)
             if p and os.path.isdir(p)}
    return sorted(trees)


def _mount_tmpfs_keeping_code(d: str, size_mb: int) -> list[str]:
    """A fresh tmpfs on ``d``, with the code trees under ``d`` bound back read-only (through O_PATH fds)."""
    under = [p for p in _code_trees() if p.startswith(d.rstrip("/") + "/")]
    keep = [p for p in under if not any(p.startswith(q + "/") for q in under)]
    fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in keep]
    try:
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,nr_inodes=8192,mode=1777")
        for p, fd in fds:
            os.makedirs(p, 0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            mount("none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for _, fd in fds:
            os.close(fd)
    return keep


def _private_dirs(z: Zygote, lim: dict, probe: list[str] | None) -> bool:
    """New mount + IPC namespace; fresh size-capped tmpfs on every world-writable directory; /proc for the pid ns."""
    mounted = []
    try:
        unshare(CLONE_NEWNS | CLONE_NEWIPC)
    except OSError as e:
        if probe is not None:
            probe.append(f"private_tmp=inactive: {e}; a private directory under the real /tmp is used")
            return False
        if z.prot.get("private_tmp", "").startswith("active"):
            raise
        return False
    size_mb = max(16, 4 * int(lim["file_size_mb"]))
    kept = []
    for d in WRITABLE_DIRS:
        if os.path.isdir(d):
            kept += _mount_tmpfs_keeping_code(d, size_mb)
            mounted.append(d)
    os.mkdir("/tmp/work", 0o700)
    if z.is_root:
        os.chown("/tmp/work", z.uid, z.gid)
    if z.own_pid_fd is not None:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            if probe is not None:
                probe.append("private_proc=active: /proc shows only the task's own pid namespace")
        except OSError as e:
            if probe is not None:
                probe.append(f"private_proc=inactive: {e}")
    if probe is not None:
        probe.append(f"private_tmp=active: fresh {size_mb} MB tmpfs on {', '.join(mounted)}; IPC namespace private"
                     + (f"; code bound back read-only: {', '.join(kept)}" if kept else ""))
    return True


def _drop_capabilities() -> None:
    """Inside our user namespace the child is uid 0 with every capability over its namespaces: drop them all
    (bounding set, ambient, effective/permitted/inheritable) before running untrusted code."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = ctypes.create_string_buffer(24)  # two empty {effective, permitted, inheritable}
    _check(_libc.capset(ctypes.c_char_p(header), data), "capset")


def _set_rlimits(lim: dict, is_root: bool, user_procs: int, probe: list[str] | None) -> None:
    mem = int(lim["memory_mb"]) << 20
    cpu = max(1, int(float(lim["cpu_s"]) + 0.999))
    fsize = int(lim["file_size_mb"]) << 20
    nproc = int(lim["max_procs"])
    if not is_root:  # RLIMIT_NPROC counts every process of the user: allow the ones that already exist
        nproc += user_procs
    settings = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_FSIZE, fsize),
                (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)]
    for which, value in settings:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY and not is_root:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
    if probe is not None:
        probe.append("rlimits=active: RLIMIT_AS=memory_mb, RLIMIT_CPU=cpu_s, RLIMIT_FSIZE=file_size_mb, "
                     "RLIMIT_NPROC=max_procs (per unique uid), RLIMIT_NOFILE=256, no core dumps")


def _count_user_procs(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                n += os.stat(f"/proc/{name}").st_uid == uid
    return n


def _execute(task: dict, meta_fd: int) -> None:
    """Run the untrusted code (or entry function) in this process and exit with its outcome on the meta channel."""
    import io

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    sys.argv = ["<sandbox>"]
    code = 0
    try:
        if task.get("entry"):
            value = _run_entry(task)
            _meta(meta_fd, {"value": value})
        else:
            import builtins

            sys.modules["__main__"] = mod = type(sys)("__main__")
            mod.__dict__["__builtins__"] = builtins
            exec(compile(task["code"], "<sandbox>", "exec"), mod.__dict__)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        _meta(meta_fd, {"exc": {"type": "SystemExit", "code": e.code if isinstance(e.code, int | None) else
                                str(e.code)[:200], "msg": ""}})
    except BaseException as e:  # noqa: B036 - everything the program raises is its own outcome
        code = 1
        try:
            _meta(meta_fd, {"exc": {"type": type(e).__name__, "msg": str(e)[:500]}})
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code & 0xFF)


def _meta(fd: int, rec: dict) -> None:
    data = (json.dumps(rec) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _run_entry(task: dict):
    """Import ``module:function`` and call function(payload, rpc); a coroutine result is awaited."""
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
    rpc = ChildRPC(4, 5, int(task.get("max_message_bytes", 8 << 20))) if task.get("rpc") else None
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
            write_frame_bytes(self._wfd, data)

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


def write_frame_bytes(fd: int, data: bytes) -> None:
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


# ------------------------------------------------------------------------------------------------------------- main

PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "typing", "random",
           "hashlib", "statistics", "fractions", "decimal", "datetime", "copy", "operator", "json", "io",
           "traceback", "asyncio", "threading", "tempfile", "importlib")


def main(argv: list[str]) -> int:
    """``serve``: answer tasks until stdin closes. ``once``: one task (same protocol, one frame each way)."""
    mode = argv[1] if len(argv) > 1 else "serve"
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the parent's terminal is the parent's to handle
    for name in PRELOAD:  # shared with every forked child: nothing to import from disk per task
        __import__(name)
    z = Zygote(hide=options.get("hide", []))
    try:
        try:
            z.setup()
        except BaseException as e:  # noqa: B036
            write_frame(1, {"ready": False, "error": repr(e)})
            return 1
        write_frame(1, {"ready": True, "protections": z.prot, "uid": z.uid})
        while True:
            try:
                task = read_frame(0)
            except EOFError:
                return 0
            try:
                res = z.run(task)
            except BaseException as e:  # noqa: B036 - report, keep serving
                res = {"status": "sandbox_error", "returncode": None, "reason": f"zygote: {e!r}", "stdout": "",
                       "stderr": "", "duration_s": 0.0, "value": None, "events": []}
            write_frame(1, res)
            if mode == "once":
                return 0
    finally:
        z.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
