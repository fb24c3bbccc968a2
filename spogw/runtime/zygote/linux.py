"""The kernel's isolation primitives, through ctypes: namespaces, mounts, prctl, seccomp, capabilities, rlimits.

Nothing here decides policy; ``zygote.py``, ``rootfs.py`` and ``child.py`` do. Every wrapper raises ``OSError``
with the call's name on failure, so a refused step can be reported (``protections``) or fail its task closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import struct

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUTS = 0x00020000, 0x08000000, 0x04000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_DUMPABLE = 1, 38, 22, 4
PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 24, 47, 4
_NR_PIVOT_ROOT = 155


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


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_NR_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
}
_NR_SOCKET, _NR_CLONE, _NR_CLONE3 = 41, 56, 435
_NS_FLAGS = 0x7E020080  # every CLONE_NEW* flag (incl. CLONE_NEWTIME)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


@functools.lru_cache(maxsize=2)
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
    if os.uname().machine != "x86_64":
        raise OSError(errno.ENOSYS, f"no BPF filter written for {os.uname().machine}")
    prog = seccomp_program(network)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp")


# ------------------------------------------------------------------------------------------ capabilities and rlimits


def drop_capabilities() -> None:
    """Inside our user namespace the child is uid 0 with every capability over its namespaces: drop them all
    (bounding set, ambient, effective/permitted/inheritable) before running untrusted code."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = ctypes.create_string_buffer(24)  # two empty {effective, permitted, inheritable}
    _check(_libc.capset(ctypes.c_char_p(header), data), "capset")


def set_rlimits(lim: dict, is_root: bool, user_procs: int) -> None:
    """RLIMIT_AS = memory_mb, CPU = cpu_s (SIGXCPU, then SIGKILL a second later), FSIZE, NPROC, NOFILE, no cores."""
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
        _cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY and not is_root:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))


def count_user_procs(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                n += os.stat(f"/proc/{name}").st_uid == uid
    return n
