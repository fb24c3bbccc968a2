"""One vLLM OpenAI server process, started (or adopted) and stopped by spogw.

:class:`EngineServer` ``launch()``es the server without waiting (start-up takes ~40-200 s on 2 CPU cores, so
the caller does other set-up meanwhile) and ``ready()`` waits for it: health checks until
``startup_timeout_s``, and on failure :class:`EngineUnavailable` naming the cause (not enough memory, the port
taken, vLLM missing, an exit status) with the log's tail. Its settings:

* a free loopback port (or ``--engine.port``; a taken one is refused before anything starts);
* the KV cache sized from the memory available at start (``--kv-cache-memory-bytes``, 20 % of it, 1-4 GiB),
  because vLLM's default asks for 92 % of the host's RAM on a CPU and refuses to start on a shared machine;
* every core computing (one thread per core, not pinned: ``VLLM_CPU_OMP_THREADS_BIND=nobind``; vLLM's default
  computes on one core of two, and pinned threads starve beside another process pinned to the same cores);
* an explicit dtype (recorded by :meth:`EngineServer.record`);
* runtime LoRA loading (``--enable-lora``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) for the generator's adapters;
* no chunked prefill: vLLM 0.32's CPU runner crashes when a *seeded* request's prefill is split
  ("CPU Generator does not use offset"), and the generator seeds every request;
* its log in the run directory (``<run_dir>/engine/server.log``).

The server runs in its own process group; :meth:`EngineServer.stop` ends the whole group (server, engine core,
workers). A state file (:mod:`spogw.engine.process`) lets the next run find a server that a ``kill -9`` left
behind and adopt it (same settings) or stop it, so that there is never a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from spogw.engine import process as proc_
from spogw.engine.options import EngineOptions, has_gpu

SERVED_NAME = "base"
"""The name the base model is served under (requests for an adapter name the adapter instead)."""
VLLM_ENTRY = ["-m", "vllm.entrypoints.openai.api_server"]
VLLM_SITE = Path(__file__).resolve().parent / "vllm_site"
"""Put on the CPU server's PYTHONPATH: its sitecustomize installs faster LoRA operators (spogw_lora_cpu)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot serve (vLLM missing, failed to start, died, answered garbage); the message names why."""


def say(message: str) -> None:
    """One line on the console for the user (the engine's few messages: started, reused, fell back)."""
    print(f"spogw: engine: {message}", file=sys.stderr, flush=True)


def find_python(options: EngineOptions) -> str:
    """The interpreter that has vLLM (see ``--engine.python``); raises EngineUnavailable naming what is missing."""
    if options.python is not None:
        if not (Path(options.python).is_file() and os.access(options.python, os.X_OK)):
            raise EngineUnavailable(f"`--engine.python {options.python}` is not an executable file")
        return options.python
    candidates = [os.environ.get("SPOGW_ENGINE_PYTHON")]
    checkout = Path(__file__).resolve().parents[2]
    candidates += [str(Path.cwd() / ".venv-vllm" / "bin" / "python"), str(checkout / ".venv-vllm" / "bin" / "python")]
    for python in dict.fromkeys(c for c in candidates if c):
        if Path(python).is_file() and os.access(python, os.X_OK):
            return python
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise EngineUnavailable("vLLM is not installed (no --engine.python, $SPOGW_ENGINE_PYTHON or .venv-vllm, and "
                            "this interpreter cannot import vllm; `make install` sets it up on Linux x86-64)")


class EngineServer:
    """The server for ``model`` with ``options``; its log and records go to ``run_dir``."""

    def __init__(self, options: EngineOptions, model: str, run_dir: str | Path):
        self.options, self.model_name, self.run_dir = options, model, Path(run_dir)
        self.port: int | None = None
        self.pid: int | None = None
        self.started: int | None = None
        self.adopted = False
        self.reason: str | None = None
        """Why the engine is not used (set when it fell back): None while it serves."""
        self._proc: subprocess.Popen | None = None
        self._state_path: Path | None = None
        self._ready = False
        self._launched_at = 0.0
        self.startup_s: float | None = None
        self.log_path = self.run_dir / "engine" / "server.log"
        self.kv_cache_bytes: int | None = None
        self.gpu = has_gpu()

    # -- identity ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def identity(self) -> str:
        """Names what answers (model and dtype): the executor's response-cache identity and the generator's record."""
        return f"engine:{self.model_name}:{self.options.dtype}"

    @property
    def available(self) -> bool:
        return self.reason is None

    def record(self) -> dict[str, Any]:
        """What the run's records say about the engine."""
        return {"backend": "vllm" if self.available else "transformers (fallback)", "fallback_reason": self.reason,
                "dtype": self.options.dtype, "model": self.model_name, "port": self.port, "pid": self.pid,
                "adopted": self.adopted, "kv_cache_bytes": self.kv_cache_bytes, "startup_s": self.startup_s,
                "threads": self._threads(), "log": str(self.log_path)}

    # -- the command ---------------------------------------------------------------------------------

    def _threads(self) -> str:
        """VLLM_CPU_OMP_THREADS_BIND: ``nobind`` for all (unpinned), the core list for pin, or the user's list."""
        threads = self.options.threads
        return "nobind" if threads == "all" else proc_.cpu_list() if threads == "pin" else threads

    def _kv_bytes(self) -> int:
        if self.options.kv_cache_gib is not None:
            return int(self.options.kv_cache_gib * 2**30)
        available = proc_.available_memory() or 8 * 2**30
        return int(min(max(0.2 * available, 2**30), 4 * 2**30))

    def _command(self, python: str, port: int) -> list[str]:
        from spogw.models import resolve_model

        o = self.options
        head = list(o.command) if o.command else [python, *VLLM_ENTRY]
        args = ["--model", resolve_model(self.model_name), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", SERVED_NAME, "--dtype", o.dtype, "--max-model-len", str(o.max_model_len),
                "--enable-lora", "--max-lora-rank", str(o.max_lora_rank), "--max-loras", "1",
                "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(o.max_model_len, 2048)),
                "--disable-uvicorn-access-log", "--generation-config", "vllm"]
        if self.gpu:
            args += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        else:
            self.kv_cache_bytes = self._kv_bytes()
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        return head + args + [str(a) for a in o.extra_args]

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if not self.gpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self._threads()
            if self._threads() == "nobind":  # one compute thread per core, left to the OS scheduler
                env["OMP_NUM_THREADS"] = str(len(proc_.cpu_list().split(",")))
            # vllm-cpu's LoRA operators copy a weight matrix per token; ours (vllm_site/spogw_lora_cpu.py) do not
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VLLM_SITE), os.environ.get("PYTHONPATH")) if p)
        return env

    def _fingerprint(self, command: list[str]) -> str:
        """Everything that makes two servers interchangeable: the command without its port, and the binding."""
        i = command.index("--port")
        same = command[:i] + command[i + 2:]
        if "--kv-cache-memory-bytes" in same:  # sized from free memory at start: not a difference in kind
            j = same.index("--kv-cache-memory-bytes")
            same = same[:j] + same[j + 2:]
        blob = json.dumps([same, self._env().get("VLLM_CPU_OMP_THREADS_BIND")])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- start ---------------------------------------------------------------------------------------

    def launch(self) -> EngineServer:
        """Adopt a server a killed run left with these settings, or start one; do not wait for it."""
        if self.pid is not None:
            return self
        python = "" if self.options.command else find_python(self.options)
        probe = self._command(python, 0)
        fingerprint = self._fingerprint(probe)
        if self._adopt_or_clear(fingerprint):
            return self
        if self.options.port is not None and proc_.port_taken(self.options.port):
            raise EngineUnavailable(f"`--engine.port {self.options.port}` is taken by another process (pass "
                                    "--engine.port null for a free one)")
        self.port = self.options.port or proc_.free_port()
        command = self._command(python, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} spogw starts: {' '.join(command)}\n".encode())
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self._env(), start_new_session=True)
        self.pid, self.started = self._proc.pid, proc_.start_time(self._proc.pid)
        self._launched_at = time.monotonic()
        self._state_path = proc_.registry_dir() / f"{fingerprint}-{self.port}.json"
        proc_.write_state(self._state_path, {
            "pid": self.pid, "started": self.started, "port": self.port, "fingerprint": fingerprint,
            "owner": os.getpid(), "owner_started": proc_.start_time(os.getpid()), "log": str(self.log_path),
            "model": self.model_name, "dtype": self.options.dtype, "command": command,
            "kv_cache_bytes": self.kv_cache_bytes})
        cores = "GPU" if self.gpu else f"threads {self.options.threads} ({self._threads()})"
        kv = f", {self.kv_cache_bytes / 2**30:.1f} GiB KV cache" if self.kv_cache_bytes else ""
        say(f"starting vLLM ({self.options.dtype}{kv}, {cores}) on port {self.port}; log: {self.log_path}")
        return self

    def _adopt_or_clear(self, fingerprint: str) -> bool:
        """Adopt an orphaned server with this fingerprint (if ``reuse``); stop orphans that cannot be reused."""
        adopted = False
        for path, state in proc_.read_states():
            server_up = proc_.is_running(state.get("pid"), state.get("started"))
            if not server_up:
                path.unlink(missing_ok=True)  # a stale file: its server is gone
                continue
            if proc_.is_running(state.get("owner"), state.get("owner_started")):
                continue  # a live run's server: not ours to touch
            port = int(state.get("port", 0))
            if (not adopted and self.options.reuse and state.get("fingerprint") == fingerprint
                    and _healthy(f"http://127.0.0.1:{port}")):
                state.update(owner=os.getpid(), owner_started=proc_.start_time(os.getpid()))
                proc_.write_state(path, state)
                self.pid, self.started, self.port, self.adopted = state["pid"], state["started"], port, True
                self.log_path, self.kv_cache_bytes = Path(state.get("log", self.log_path)), state.get("kv_cache_bytes")
                self._state_path, self._ready, self.startup_s = path, True, 0.0
                say(f"reusing the vLLM server a stopped run left on port {port} (pid {self.pid}); log: {self.log_path}")
                adopted = True
                continue
            proc_.stop_group(state["pid"], state.get("started"))
            path.unlink(missing_ok=True)
            say(f"stopped the vLLM server a stopped run left on port {port} (pid {state['pid']}): "
                + ("other settings" if state.get("fingerprint") != fingerprint else
                   "--engine.reuse false" if not self.options.reuse else "it did not answer"))
        return adopted

    def ready(self) -> EngineServer:
        """Wait until the server answers; raises EngineUnavailable (the server stopped) when it cannot."""
        if self.reason is not None:
            raise EngineUnavailable(self.reason)
        if self._ready:
            return self
        self.launch()
        deadline = self._launched_at + self.options.startup_timeout_s
        bar = _wait_bar()
        try:
            while True:
                if not self.alive():
                    code = self._proc.poll() if self._proc is not None else None
                    self.stop()
                    cause = proc_.diagnose(self.log_path, code)
                    raise EngineUnavailable(f"the vLLM server exited during start-up ({cause}); "
                                            f"log {self.log_path}:\n{proc_.log_tail(self.log_path)}")
                if _healthy(f"http://127.0.0.1:{self.port}", SERVED_NAME):
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineUnavailable(f"the vLLM server did not answer within --engine.startup_timeout_s "
                                            f"{self.options.startup_timeout_s:g}; log {self.log_path}:\n"
                                            f"{proc_.log_tail(self.log_path)}")
                bar.update(0)
                time.sleep(0.5)
        finally:
            bar.close()
        self.startup_s = round(time.monotonic() - self._launched_at, 1)
        self._ready = True
        return self

    # -- running and stopping ------------------------------------------------------------------------

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return proc_.is_running(self.pid, self.started)

    def death_note(self) -> str:
        """Why the server is gone, with its log's tail (for a server that died mid-run)."""
        code = self._proc.poll() if self._proc is not None else None
        return (f"the vLLM server (pid {self.pid}, port {self.port}) died ({proc_.diagnose(self.log_path, code)}); "
                f"log {self.log_path}:\n{proc_.log_tail(self.log_path, lines=8)}")

    def stop(self) -> None:
        """Stop the server's whole process group and remove its state file (safe to call twice)."""
        if self.pid is not None:
            proc_.stop_group(self.pid, self.started)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        if self._state_path is not None:
            self._state_path.unlink(missing_ok=True)
        self.pid = self.started = self._proc = self._state_path = None
        self._ready = False


def _healthy(base: str, model: str | None = None, timeout_s: float = 5.0) -> bool:
    """GET /health answers 200 and (with ``model``) /v1/models lists it."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as reply:
            if reply.status != 200:
                return False
        if model is None:
            return True
        with urllib.request.urlopen(f"{base}/v1/models", timeout=timeout_s) as reply:
            return model in {m.get("id") for m in json.loads(reply.read()).get("data", [])}
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _wait_bar():
    from tqdm.auto import tqdm

    return tqdm(total=None, desc="engine start-up", bar_format="{desc}: {elapsed}", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)
