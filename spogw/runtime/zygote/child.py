"""One sandboxed child, from the template's fork to its exit: isolate, read the task, run its role.

    G (root, pid 1 of a fresh pid namespace, born in the zygote's cgroups): setsid; oom_score_adj; network;
      new mount + IPC namespace with fresh tmpfs on /tmp and /dev/shm and a fresh /proc (``rootfs``);
      its fds on 0.. (all others closed); rlimits; setgroups([]) / setgid / setuid (or, in a user namespace,
      every capability dropped); no_new_privs; parent-death signal; seccomp; audit hook (untrusted roles)
    then reads its payload (a memfd only it holds), reports set-up done on a channel closed before any untrusted
    code runs, and runs its role:

    program   ``code`` as ``__main__``                      entry     ``function(payload, rpc)`` (``rpc.py``)
    solution  a check's solution, serving calls (``check``)  tests     a check's tests, judging (``check``)

The tests' process (trusted code that writes nothing) skips the private mounts: it keeps the template's
read-only root, with its own uid, rlimits, no_new_privs, seccomp, and is not dumpable.

fds: 0/1/2 stdio, 3 meta (the outcome: exception, entry value, audit events), then the role's own: entry 4/5 the
RPC pipes; solution 4 requests in, 5 replies out; tests 4 requests out, 5 replies in, 6 the verdict. A step that
worked in the zygote's probe but fails here fails the task closed (``sandbox_error``), never half-isolated.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys

from . import linux, rootfs
from .linux import CLONE_NEWNET, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG

AUDITED = frozenset({
    "os.system", "subprocess.Popen", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "socket.connect", "socket.bind", "socket.sendto", "os.kill", "os.killpg", "ctypes.dlopen", "os.setuid",
    "shutil.rmtree", "socket.__new__", "open",
})
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
       "PYTHONDONTWRITEBYTECODE": "1"}


class SandboxSetupError(Exception):
    pass


def main(z, req: dict, fds: list[int]) -> None:
    """Runs in the forked child: isolate, read the payload, run the role. Never returns."""
    probe: list[str] = []
    layout = {"setup": fds[4], "payload": fds[5]}  # moved by _isolate; the set-up channel says how it went
    try:
        _isolate(z, req, fds, probe, layout)
        payload = _read_payload(layout["payload"])
        if req["role"] == "program":
            _write_files(payload.get("files") or {})
    except BaseException as e:  # noqa: B036 - fail closed: never run untrusted code half-isolated
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"sandbox setup: {e!r} in {where.name}() line {where.lineno}"
        _meta(layout["setup"], {"ok": False, "msg": msg})
        os._exit(112)
    # The set-up channel is closed before any untrusted code runs: what arrives on it is the sandbox's own word
    # (the meta channel can be written by the program too, so a failure there can never pose as sandbox_error).
    _meta(layout["setup"], {"ok": True, "probe": probe})
    os.close(layout["setup"])
    _execute(req["role"], payload)


def _isolate(z, req: dict, fds: list[int], probe: list[str], layout: dict) -> None:
    lim, role = req["limits"], req["role"]
    is_probe = bool(req.get("probe"))
    os.setsid()
    user_procs = 0 if z.is_root else linux.count_user_procs(os.getuid())  # before /proc is replaced
    with contextlib.suppress(OSError):  # under memory pressure the kernel picks sandboxes first, solutions first
        linux.write_file("/proc/self/oom_score_adj", "500" if role == "tests" else "1000")
    private = False
    if z.is_root or z.userns:  # namespace steps first: they use the template's fds (cgroups: born in them)
        if lim.get("network") and z.host_net_fd is not None:
            linux.setns(z.host_net_fd, CLONE_NEWNET)
        if z.userns and not lim.get("network"):
            linux.unshare(CLONE_NEWNET)
        if role != "tests":  # the tests (trusted code) write nothing: they keep the template's read-only root
            private = _private_dirs(z, req, probe if is_probe else None)
    # fds: sources are first copied above every target so that no dup2 clobbers a source still to be moved
    order = fds[:4] + fds[6:] + fds[4:6]  # stdio, meta, the role's own, then setup and payload
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in order]
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(high), 1 << 16)
    layout.update(setup=len(high) - 2, payload=len(high) - 1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if role == "tests":
        home = "/"
    elif not private and "workdir" not in req:
        raise SandboxSetupError("no private working directory: the per-task tmpfs could not be mounted")
    else:
        home = "/tmp/work" if private else req["workdir"]  # else: made (and removed) by the zygote
    linux.set_rlimits(lim, z.is_root, user_procs)
    if is_probe:
        probe.append("rlimits=active: RLIMIT_AS=memory_mb, RLIMIT_CPU=cpu_s, RLIMIT_FSIZE=file_size_mb, "
                     "RLIMIT_NPROC=max_procs (per unique uid), RLIMIT_NOFILE=256, no core dumps")
    if z.is_root:
        os.setgroups([])
        os.setgid(int(req["uid"]))
        os.setuid(int(req["uid"]))
    elif z.userns:
        linux.drop_capabilities()
    if role == "tests":  # not ptrace-able, /proc/<pid>/mem unreadable, even by a process of the same uid
        linux.prctl(PR_SET_DUMPABLE, 0)
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: changing credentials clears it
    if is_probe:
        probe.append("no_new_privs=active: setuid binaries cannot regain privileges")
    os.chdir(home)
    os.umask(0o077)
    os.environ.clear()
    os.environ.update({**ENV, "HOME": home})
    try:
        linux.install_seccomp(bool(lim.get("network")))
        if is_probe:
            probe.append("seccomp=active: BPF filter refuses ptrace, mount, unshare/setns, namespace clone, bpf, "
                         "keyctl, io_uring, ... and (without network) AF_INET/AF_INET6/AF_PACKET sockets")
    except OSError as e:
        if is_probe:
            probe.append(f"seccomp=inactive: {e}")
        elif "seccomp" in req.get("required", ()):
            raise
    if role != "tests":
        _install_audit_hook(3)
        if is_probe:
            probe.append("audit_hook=record-only: os.system, subprocess, fork, exec, socket.connect/bind, os.kill, "
                         "ctypes.dlopen are reported in result.events")


def _private_dirs(z, req: dict, probe: list[str] | None) -> bool:
    size_mb = max(16, 4 * int(req["limits"]["file_size_mb"]))
    uid = int(req["uid"])
    trees = z.bound if z.minimal else rootfs.legacy_code_trees()
    try:
        dirs = rootfs.private_dirs(z.minimal, trees, size_mb, uid if z.is_root else None,
                                   proc=z.own_pid_fd is not None)
    except OSError as e:
        if probe is not None:
            probe.append(f"private_tmp=inactive: {e}; a private directory under the real /tmp is used")
            return False
        if "private_tmp" in req.get("required", ()):
            raise
        return False
    if probe is not None:
        probe.append(f"private_tmp=active: fresh {size_mb} MB tmpfs on {', '.join(dirs)}; IPC namespace private")
        if z.own_pid_fd is not None:
            probe.append("private_proc=active: /proc shows only the task's own pid namespace")
    return True


def _read_payload(fd: int) -> dict:
    size = os.fstat(fd).st_size
    chunks, off = [], 0
    while off < size:
        b = os.pread(fd, min(size - off, 1 << 24), off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    os.close(fd)
    return json.loads(b"".join(chunks)) if chunks else {}


def _write_files(files: dict) -> None:
    for name, text in files.items():
        if os.path.isabs(name) or ".." in name.split("/"):
            raise SandboxSetupError(f"files: {name!r} must be a relative path inside the working directory")
        if os.path.dirname(name):
            os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "w") as f:
            f.write(text)


def _install_audit_hook(meta_fd: int, limit: int = 16) -> None:
    """Record (never block) notable events: a Python audit hook is no security boundary (ctypes escapes it), but it
    tells the stage *why* a program failed, e.g. "socket.connect ('127.0.0.1', 8080)" before EACCES."""
    count = [0]

    def hook(event: str, args: tuple) -> None:
        if event in AUDITED and count[0] < limit:
            if event == "open" and not (isinstance(args[0], str) and args[0].startswith(("/proc", "/dev/mem"))):
                return  # only opens that look for other processes' memory are worth a line
            count[0] += 1
            with contextlib.suppress(Exception):
                os.write(meta_fd, (json.dumps({"event": event, "args": repr(args)[:200]}) + "\n").encode())

    sys.addaudithook(hook)


def _meta(fd: int, rec: dict) -> None:
    data = (json.dumps(rec) + "\n").encode()
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]


def _execute(role: str, payload: dict) -> None:
    """Run the role in this process and exit with its outcome on the meta channel (fd 3)."""
    import io

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    sys.argv = ["<sandbox>"]
    code = 0
    try:
        if role == "entry":
            from .rpc import run_entry

            _meta(3, {"value": run_entry(payload)})
        elif role == "solution":
            from .check import serve_solution

            serve_solution(payload)
        elif role == "tests":
            from .check import run_tests

            run_tests(payload)
        else:
            import builtins

            sys.modules["__main__"] = mod = type(sys)("__main__")
            mod.__dict__["__builtins__"] = builtins
            exec(compile(payload["code"], "<sandbox>", "exec"), mod.__dict__)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        _meta(3, {"exc": {"type": "SystemExit", "code": e.code if isinstance(e.code, int | None) else
                          str(e.code)[:200], "msg": ""}})
    except BaseException as e:  # noqa: B036 - everything the program raises is its own outcome
        code = 1
        try:
            _meta(3, {"exc": {"type": type(e).__name__, "msg": str(e)[:500]}})
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:  # noqa: B036
            pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code & 0xFF)
