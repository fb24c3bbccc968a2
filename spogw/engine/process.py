"""Process plumbing of the engine: free ports, process identity, state files, memory, log tails, stopping.

A state file (``$SPOGW_CACHE/engines/<id>.json``) describes a running server: its process (pid and start time,
so a recycled pid is never mistaken for it), port, settings fingerprint, log, and the spogw process that owns
it (pid and start time). A server whose owner is gone was left by a killed run: the next run adopts it (same
fingerprint) or stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any


def registry_dir() -> Path:
    """Where the state files of running engines live: one machine-wide place (``$SPOGW_ENGINE_REGISTRY``, else
    ``$SPOGW_CACHE/engines``), so that any run finds any orphan."""
    from spogw.models import cache_dir

    path = Path(os.environ.get("SPOGW_ENGINE_REGISTRY") or cache_dir() / "engines")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether something already listens on (or holds) ``127.0.0.1:port``."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def is_running(pid: int | None, started: int | None) -> bool:
    """Whether process ``pid`` exists and is the one that started at ``started`` (not a recycled pid, not a zombie)."""
    if not pid or start_time(pid) is None or (started is not None and start_time(pid) != started):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_list() -> str:
    """The cores this process may run on, as vLLM's binding syntax (``0,1,2``)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = list(range(os.cpu_count() or 1))
    return ",".join(map(str, cores))


def log_tail(path: Path | None, lines: int = 25, width: int = 400) -> str:
    """The last lines of a log, each cut to ``width`` characters (vLLM logs long config lines)."""
    if path is None or not Path(path).is_file():
        return "(no log)"
    with Path(path).open("rb") as f:
        f.seek(max(0, Path(path).stat().st_size - 64_000))
        text = f.read().decode("utf-8", "replace")
    tail = [line[:width] for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(tail) or "(empty log)"


CAUSES = (
    (("Available memory on node", "less than desired CPU memory", "Cannot allocate memory", "out of memory",
      "OutOfMemory", "MemoryError", "insufficient memory", "No available memory for the cache blocks"),
     "not enough memory"),
    (("address already in use", "Errno 98"), "the port is taken"),
    (("No module named vllm", "No module named 'vllm'"), "vLLM is not installed in that interpreter"),
)


def diagnose(log: Path | None, returncode: int | None) -> str:
    """A short cause for a server that failed, from its exit status and its log."""
    text = log_tail(log, lines=200, width=2000) if log else ""
    for needles, cause in CAUSES:
        if any(n.lower() in text.lower() for n in needles):
            return cause
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else returncode
        return f"killed by {name}" + (" (out of memory?)" if returncode == -signal.SIGKILL else "")
    return f"exit status {returncode}" if returncode is not None else "unknown cause"


def stop_group(pid: int, started: int | None, *, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group (the server and its engine/worker processes), SIGKILL after ``grace_s``."""
    if not is_running(pid, started):
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid))  # members that are zombies (exited, not yet reaped) count as gone


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def read_states() -> list[tuple[Path, dict[str, Any]]]:
    """Every state file with its content (unreadable ones are removed: they are torn writes)."""
    out = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return out
