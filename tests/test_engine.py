"""The engine's lifecycle against a real server process on loopback (tests/engine_standin.py, no vLLM needed):
port choice, health wait and its timeout, start-up failures with their causes, the fallback, stopping on exit,
error, SIGTERM and SIGINT, and the state file that lets a run adopt or stop what a ``kill -9`` left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spogw.engine import Engine, EngineOptions, EngineServer, EngineUnavailable, open_engine
from spogw.engine import process as proc_
from spogw.engine.process import group_members

STANDIN = str(Path(__file__).with_name("engine_standin.py"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch):
    """Each test its own state-file directory (a real one: the engine reads and writes it)."""
    path = tmp_path / "registry"
    monkeypatch.setenv("SPOGW_ENGINE_REGISTRY", str(path))
    for key in ("STANDIN_STARTUP_S", "STANDIN_NEVER_READY", "STANDIN_FAIL", "STANDIN_BIND_PORT", "STANDIN_DIE_AFTER",
                "STANDIN_GARBAGE", "STANDIN_RECORD"):
        monkeypatch.delenv(key, raising=False)
    return path


def options(**overrides) -> EngineOptions:
    return EngineOptions(**{"command": [sys.executable, STANDIN], "startup_timeout_s": 30.0, **overrides})


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pid):
            return True
        time.sleep(0.1)
    return False


def test_starts_on_a_free_port_waits_for_health_and_stops_the_whole_group(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_STARTUP_S", "1.5")
    server = EngineServer(options(dtype="float32"), str(tmp_path), tmp_path / "run").launch()
    try:
        assert server.ready() is server and server.startup_s >= 1.5
        assert proc_.port_taken(server.port)
        assert len(group_members(server.pid)) == 2  # the server and its "engine core" child
        (state_path,) = proc_.registry_dir().glob("*.json")
        state = json.loads(state_path.read_text())
        assert state["pid"] == server.pid and state["port"] == server.port and state["owner"] == os.getpid()
        log = server.log_path.read_text()
        assert server.log_path == tmp_path / "run" / "engine" / "server.log"
        assert "--dtype float32" in log and "--enable-lora" in log and "--no-enable-chunked-prefill" in log
        assert "--kv-cache-memory-bytes" in log
        record = server.record()
        assert record["dtype"] == "float32" and record["backend"] == "vllm" and record["kv_cache_bytes"] >= 2**30
        pid = server.pid
    finally:
        server.stop()
    assert wait_gone(pid) and not list(proc_.registry_dir().glob("*.json"))


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(EngineUnavailable, match=f"`--engine.port {port}` is taken"):
            EngineServer(options(port=port), str(tmp_path), tmp_path).launch()
    assert not list(proc_.registry_dir().glob("*.json"))


def test_a_server_that_cannot_bind_its_port_is_diagnosed(tmp_path, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setenv("STANDIN_BIND_PORT", str(held.getsockname()[1]))
        server = EngineServer(options(), str(tmp_path), tmp_path).launch()
        with pytest.raises(EngineUnavailable, match=r"exited during start-up \(the port is taken\)") as err:
            server.ready()
    assert "address already in use" in str(err.value)  # the log's tail comes with the cause


def test_not_enough_memory_names_the_cause_and_the_log_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL", "memory")
    server = EngineServer(options(), str(tmp_path), tmp_path).launch()
    with pytest.raises(EngineUnavailable, match=r"not enough memory") as err:
        server.ready()
    assert "Available memory on node 0" in str(err.value) and str(server.log_path) in str(err.value)
    assert not list(proc_.registry_dir().glob("*.json"))


def test_health_wait_times_out_with_the_log_tail_and_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_NEVER_READY", "1")
    server = EngineServer(options(startup_timeout_s=2.0), str(tmp_path), tmp_path).launch()
    pid = server.pid
    start = time.monotonic()
    with pytest.raises(EngineUnavailable, match=r"did not answer within --engine.startup_timeout_s 2") as err:
        server.ready()
    assert time.monotonic() - start < 15
    assert "standin: still compiling" in str(err.value)
    assert wait_gone(pid)


def test_missing_vllm_falls_back_with_one_line(tmp_path, capsys):
    """The real case: an interpreter without vllm runs `-m vllm.entrypoints.openai.api_server` and fails."""
    engine = Engine(EngineOptions(python=sys.executable, startup_timeout_s=60), str(tmp_path), tmp_path)
    with open_engine(engine.options, str(tmp_path), tmp_path) as engine:
        assert engine.ready() is None and not engine.available
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "using the transformers backends" in ln]
    assert "vLLM is not installed in that interpreter" in line
    assert engine.record()["backend"] == "transformers (fallback)" and "not installed" in engine.record()[
        "fallback_reason"]


def test_no_fallback_raises_instead(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL", "memory")
    with open_engine(options(fallback=False), str(tmp_path), tmp_path) as engine, \
            pytest.raises(EngineUnavailable, match="(?s)not enough memory.*fallback false"):
        engine.ready()


def test_one_server_per_run_stopped_on_normal_exit_and_on_error(tmp_path):
    with open_engine(options(), str(tmp_path), tmp_path) as engine:
        with open_engine(options(), str(tmp_path), tmp_path) as inner:  # a stage inside the run asks again
            assert inner is engine and engine.ready() is engine
        assert engine.alive()  # the inner user leaving does not stop the run's server
        pid = engine.pid
    assert wait_gone(pid)
    with pytest.raises(RuntimeError, match="boom"), open_engine(options(), str(tmp_path), tmp_path) as engine:
        engine.ready()
        pid = engine.pid
        raise RuntimeError("boom")
    assert wait_gone(pid) and not list(proc_.registry_dir().glob("*.json"))


PARENT = textwrap.dedent("""
    import sys, time
    from spogw.engine import EngineOptions, open_engine
    opts = EngineOptions(command=[sys.executable, {standin!r}], startup_timeout_s=30.0, dtype={dtype!r})
    with open_engine(opts, {model!r}, {run!r}) as engine:
        engine.ready()
        print("READY", engine.pid, engine.port, flush=True)
        while True:
            time.sleep(0.2)
""")


def start_parent(tmp_path, dtype: str = "native") -> tuple[subprocess.Popen, int, int]:
    code = PARENT.format(standin=STANDIN, dtype=dtype, model=str(tmp_path), run=str(tmp_path / "run"))
    # Ctrl-C as in a terminal: a run started in the background (nohup, `cmd &`) inherits SIGINT ignored
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = parent.stdout.readline()
    assert line.startswith("READY"), line
    _, pid, port = line.split()
    return parent, int(pid), int(port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminating_the_parent_stops_its_server(tmp_path, sig):
    parent, pid, _ = start_parent(tmp_path)
    assert group_members(pid)
    parent.send_signal(sig)
    assert parent.wait(timeout=120) != 0  # the stand-in's stop takes seconds; minutes under a loaded machine
    assert wait_gone(pid, timeout=60), "the server outlived its parent"
    assert not list(proc_.registry_dir().glob("*.json"))


def test_after_kill_9_the_next_run_adopts_the_server_or_stops_it(tmp_path):
    parent, pid, port = start_parent(tmp_path)
    parent.kill()  # kill -9: no cleanup ran
    parent.wait()
    assert group_members(pid), "the server should outlive a kill -9 of its parent"
    # the next run with the same settings adopts it: no second server
    again = EngineServer(options(), str(tmp_path), tmp_path / "run").launch()
    try:
        assert again.adopted and again.pid == pid and again.port == port and again.ready() is again
        (state_path,) = proc_.registry_dir().glob("*.json")
        assert json.loads(state_path.read_text())["owner"] == os.getpid()
    finally:
        again.stop()
    assert wait_gone(pid)
    # a run with other settings stops the orphan and starts its own (float16: never what native resolves to)
    parent, pid, port = start_parent(tmp_path, dtype="float16")
    parent.kill()
    parent.wait()
    other = EngineServer(options(), str(tmp_path), tmp_path / "run").launch()
    try:
        assert wait_gone(pid) and not other.adopted and other.pid != pid
        assert len(list(proc_.registry_dir().glob("*.json"))) == 1
    finally:
        other.stop()


def test_reuse_false_stops_an_orphan_with_the_same_settings(tmp_path):
    parent, pid, _ = start_parent(tmp_path)
    parent.kill()
    parent.wait()
    fresh = EngineServer(options(reuse=False), str(tmp_path), tmp_path / "run").launch()
    try:
        assert wait_gone(pid) and not fresh.adopted
    finally:
        fresh.stop()


def test_a_live_runs_server_is_left_alone(tmp_path):
    parent, pid, _ = start_parent(tmp_path)
    try:
        mine = EngineServer(options(), str(tmp_path), tmp_path / "run").launch()
        try:
            assert not mine.adopted and mine.pid != pid and group_members(pid)
        finally:
            mine.stop()
    finally:
        parent.terminate()
        parent.wait(timeout=30)
    assert wait_gone(pid)


def test_stale_state_files_are_removed(tmp_path):
    stale = proc_.registry_dir() / "dead.json"
    stale.write_text(json.dumps({"pid": 999_999_999, "started": 1, "port": 1, "owner": 999_999_998}))
    (proc_.registry_dir() / "torn.json").write_text('{"pid": 12')
    server = EngineServer(options(), str(tmp_path), tmp_path).launch()
    try:
        assert not stale.exists() and not (proc_.registry_dir() / "torn.json").exists()
    finally:
        server.stop()


def test_options_name_the_flag():
    for kwargs, flag in (({"port": 0}, "--engine.port"), ({"kv_cache_gib": 0}, "--engine.kv_cache_gib"),
                         ({"max_lora_rank": 12}, "--engine.max_lora_rank"),
                         ({"startup_timeout_s": 0}, "--engine.startup_timeout_s")):
        with pytest.raises(ValueError, match=flag):
            EngineOptions(**kwargs)
    with pytest.raises(EngineUnavailable, match="--engine.python /nowhere/python"):
        from spogw.engine.server import find_python

        find_python(EngineOptions(python="/nowhere/python"))


def test_native_dtype_is_bf16_only_where_the_cpu_computes_it(tmp_path, monkeypatch):
    from spogw.engine import options as opts

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not opts.cpu_bf16(avx2) and opts.cpu_bf16(amx) and opts.cpu_bf16(zen4)
    assert not opts.cpu_bf16(tmp_path / "missing")
    for native, resolved in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(opts, "native_bf16", lambda native=native: native)
        assert EngineOptions().dtype == resolved == EngineOptions(dtype="native").dtype
        assert EngineOptions(dtype="float32").dtype == "float32"
    with pytest.warns(UserWarning, match="--engine.dtype native"):  # still False: emulated bf16 is named
        assert EngineOptions(dtype="bfloat16").dtype == "bfloat16"


def test_fit_warns_about_emulated_bf16_precision(monkeypatch):
    from spogw.cli import warn_emulated_bf16
    from spogw.engine import options as opts

    monkeypatch.setattr(opts, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--trainer.precision 32-true"):
        assert warn_emulated_bf16({"precision": "bf16-mixed", "accelerator": "cpu"})
    assert not warn_emulated_bf16({"precision": "32-true", "accelerator": "cpu"})
    assert not warn_emulated_bf16({"precision": "bf16-mixed", "accelerator": "gpu"})
    monkeypatch.setattr(opts, "native_bf16", lambda: True)
    assert not warn_emulated_bf16({"precision": "bf16-mixed", "accelerator": "auto"})
