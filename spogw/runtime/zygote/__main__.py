"""The zygote process: ``python -I <this directory> serve|once '<options json>'`` with its control socket on fd 0.

``serve`` answers tasks until the parent closes the socket; ``once`` answers one. Options: ``hide`` (paths
covered), ``expose`` (paths bound read-only into the children's root), ``site_packages`` (bind the interpreter's
site-packages), ``preload`` (modules imported before the template is forked, so children find them loaded).

Run as a directory, this file is ``__main__`` with the directory on ``sys.path``; the siblings are loaded as the
package ``_spogw_zygote`` (their relative imports work as they do under ``spogw.runtime.zygote``), and the
directory is taken off ``sys.path`` again, so children do not import our modules by accident.
"""

import importlib.util
import json
import os
import signal
import socket
import sys

PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "typing", "random",
           "hashlib", "statistics", "fractions", "decimal", "datetime", "copy", "operator", "json", "io",
           "traceback", "asyncio", "threading", "tempfile", "importlib", "importlib.util", "base64", "struct",
           "ctypes", "fcntl", "resource", "select", "glob", "contextlib")


def _package():
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == here:
        del sys.path[0]
    spec = importlib.util.spec_from_file_location("_spogw_zygote", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_spogw_zygote"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "serve"
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the parent's terminal is the parent's to handle
    _package()
    from _spogw_zygote import check, child, outcome, plain, rpc, template, wire  # noqa: F401 - preloaded
    from _spogw_zygote.zygote import Zygote

    for name in PRELOAD:  # shared with every forked child: nothing to import from disk per task
        __import__(name)
    preload_errors = []
    for name in options.get("preload", []):
        try:
            __import__(name)
        except Exception as e:  # the entry's own import error is reported when a task imports it
            preload_errors.append(f"{name}: {type(e).__name__}: {e}")
    ctl = socket.socket(fileno=0)
    z = Zygote(options, ctl)
    try:
        try:
            z.setup()
        except BaseException as e:  # noqa: B036
            wire.send(ctl, {"ready": False, "error": repr(e)})
            return 1
        if preload_errors:
            z.prot["preload"] = f"partial: {'; '.join(preload_errors)}"
        wire.send(ctl, {"ready": True, "protections": z.prot, "uids": [z.uid, z.uid_tests]})
        while True:
            try:
                task, fds = wire.recv(ctl)
            except (EOFError, OSError):
                return 0
            if task.get("op") in ("cancel", "pause", "resume"):  # for a task that ended before it arrived
                for fd in fds:
                    os.close(fd)
                continue
            try:
                res = z.run(task, fds)
            except BaseException as e:  # noqa: B036 - report, keep serving
                res = {"status": "sandbox_error", "returncode": None, "reason": f"zygote: {e!r}", "stdout": "",
                       "stderr": "", "duration_s": 0.0, "value": None, "events": []}
                if not z.template_alive():
                    wire.send(ctl, res)
                    return 1
            wire.send(ctl, res)
            if mode == "once":
                return 0
    finally:
        z.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
