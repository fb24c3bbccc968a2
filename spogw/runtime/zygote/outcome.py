"""What happened to a task, in words: wait statuses, the children's channels and the tests' verdict, classified
into the statuses of ``spogw.runtime.sandbox.STATUSES``.

Everything parsed here except the set-up channel and the verdict channel can be written by untrusted code (the
meta channel carries the program's own exception and value): it is parsed defensively and never decides a pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

_CRASH = {signal.SIGSEGV: "segmentation fault", signal.SIGBUS: "bus error", signal.SIGILL: "illegal instruction",
          signal.SIGFPE: "floating point exception", signal.SIGABRT: "abort"}


def classify(task: dict, kid, killed_by: str | None, duration: float, oom: bool, waited: float = 0.0) -> dict:
    """One child's outcome: ``kid`` has ``status`` (wait status), ``cpu`` and the bytes of its channels; ``waited``:
    the seconds its wall clock stood still while the parent answered its requests (an entry's)."""
    lim = task["limits"]
    st, cpu = kid.status, kid.cpu
    events, value, has_value, exc = parse_meta(bytes(kid.out["meta"]))
    setup = _first_json(bytes(kid.out["setup"]))
    rc = os.waitstatus_to_exitcode(st) if st is not None else None
    if not setup.get("ok"):
        status = "sandbox_error"
        reason = setup.get("msg") or f"sandbox set-up did not complete (wait status {st}, {killed_by or 'exited'})"
    elif killed_by == "timeout":
        status, reason = "timeout", f"wall time {lim['wall_s']:g} s exceeded; process group killed"
        if waited >= 0.05:
            reason = (f"wall time {lim['wall_s']:g} s exceeded (not counting {waited:.1f} s waiting on the parent's "
                      "replies); process group killed")
    elif killed_by == "output":
        status, reason = "output", f"output exceeded {lim['max_output_bytes']} bytes; process group killed"
    elif killed_by == "parent_gone":
        status, reason = "killed", "the parent closed the control channel; child killed"
    elif killed_by == "cancelled":
        status, reason = "killed", "cancelled by the parent; child killed"
    elif st is None and kid.abandoned:
        status, reason = "killed", "ended once the tests had finished"
    elif st is None:
        status, reason = "sandbox_error", "the child's exit status was never reported"
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
            status, reason = ("ok", "sys.exit(0)") if rc == 0 and kid.role != "entry" else (
                "exit", f"sys.exit({exc.get('code')!r}) called")
        elif kind == "MemoryError":
            status, reason = "memory", f"{msg} (memory limit {lim['memory_mb']} MB)"
        else:
            status, reason = "error", msg
    elif rc == 0:
        if kid.role == "entry" and not has_value:
            status, reason = "exit", "the entry function's process exited before returning"
        else:
            status, reason = "ok", ""
    else:
        status, reason = "exit", f"exited with code {rc}"
    if oom and status != "memory":
        reason += f" (the cgroup OOM killer fired: memory limit {lim['memory_mb']} MB)"
    cap = int(lim["max_output_bytes"])
    res = {
        "status": status, "returncode": rc, "reason": reason, "duration_s": duration, "cpu_s": cpu,
        "stdout": bytes(kid.out["stdout"][:cap]).decode("utf-8", "replace"),
        "stderr": bytes(kid.out["stderr"][:cap]).decode("utf-8", "replace"),
        "value": value, "events": events,
    }
    if setup.get("probe"):
        res["probe"] = [str(x) for x in setup["probe"]]
    return res


def classify_check(task: dict, solution, tests, killed_by: str | None, duration: float, oom: bool) -> dict:
    """A check's outcome: the tests' process decides the status; the verdict is read from its channel alone."""
    s = classify(task, solution, killed_by, duration, oom)
    t = classify(task, tests, killed_by, duration, oom)
    if s["status"] == "sandbox_error" and t["status"] != "sandbox_error":  # the solution never got to run
        t.update(status="sandbox_error", reason=f"solution: {s['reason']}")
    verdict = parse_verdict(bytes(tests.out["verdict"]))
    verdict["stderr"] = t["stderr"][-2000:]
    return {
        "status": t["status"], "returncode": t["returncode"], "reason": t["reason"], "duration_s": duration,
        "cpu_s": s["cpu_s"] + t["cpu_s"], "stdout": s["stdout"], "stderr": s["stderr"], "events": s["events"],
        "value": None, "verdict": verdict,
        "solution": {"status": s["status"], "reason": s["reason"], "returncode": s["returncode"]},
    }


def parse_verdict(raw: bytes) -> dict:
    """The tests' own report (trusted: only T holds its channel): per-assert outcomes and the final verdict."""
    passed = failed = 0
    final, fail, notes, failed_lines = None, None, [], []
    for line in raw.split(b"\n"):
        if line.startswith(b"P "):
            passed += 1
        elif line.startswith(b"F "):
            failed += 1
            if len(failed_lines) < 20 and line[2:].isdigit():
                failed_lines.append(int(line[2:]))
        elif line == b"PASS":
            final = "PASS"
        elif line.startswith(b"FAIL "):
            final = "FAIL"
            fail = _first_json(line[5:])
        elif line.startswith(b"N ") and len(notes) < 8:
            with contextlib.suppress(ValueError):
                notes.append(str(json.loads(line[2:])))
    return {"passed": passed, "failed": failed, "final": final, "fail": fail, "notes": notes,
            "failed_lines": failed_lines}


def _first_json(raw: bytes) -> dict:
    try:
        rec = json.loads(raw.split(b"\n", 1)[0])
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}


def parse_meta(raw: bytes) -> tuple[list[str], object, bool, dict | None]:
    """The child's meta channel (written by untrusted code too): audit events, an entry's value, an exception."""
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
    return events, value, has_value, exc
