"""The generator and the executor through the engine, against the stand-in server (tests/engine_standin.py):
what is sent (token-id prompts, seeds, the grammar, the adapter's name), what comes back (n per prompt, in
order), adapters loaded at run time, a server dying mid-run or answering garbage, and the stages' wiring."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import REPO, STANDIN, group_members, options, registry  # noqa: F401 - registry is a fixture

from spogw.backends import ExecutorOptions, make_executor
from spogw.engine import EngineUnavailable, open_engine
from spogw.generation import Generator, make_generator

PROMPTS = [[{"role": "user", "content": "Write a workflow."}], [{"role": "user", "content": "Another one."}]]


def requests(path: Path, endpoint: str) -> list[dict]:
    return [r["body"] for r in map(json.loads, path.read_text().splitlines()) if r["path"] == endpoint]


def write_adapter(path: Path, r: int = 8) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return str(path)


@pytest.fixture
def record(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "requests.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(path))
    return path


def test_generator_sends_token_ids_seeds_and_the_grammar_and_returns_n_in_order(tiny_model, tmp_path, record):
    """guided="regex": one request per prompt carrying the whole grammar."""
    from spogw.models import load_tokenizer
    from spogw.workflows.guide import load_guide
    from spogw.workflows.parsing import parse_workflow

    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, backend="engine", engine=engine)
        gen.guided = "regex"
        assert isinstance(gen, Generator) and gen.identity == f"engine:{tiny_model}:{engine.options.dtype}"
        arrived = []
        out = gen.generate(PROMPTS, n=3, temperature=0.8, top_p=0.9, max_new_tokens=64, seed=[10, 20], guide="code",
                           on_prompt=lambda i, texts: arrived.append((i, texts)))
    assert sorted(arrived) == [(0, out[0]), (1, out[1])]
    sent = requests(record, "/v1/completions")
    assert [b["seed"] for b in sent] == [10, 20] and all(b["n"] == 3 and b["model"] == "base" for b in sent)
    assert all(b["structured_outputs"] == {"regex": load_guide("code").regex()} for b in sent)
    tok = load_tokenizer(tiny_model)
    expected = tok(tok.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert sent[0]["prompt"] == expected  # our tokenizer's rendering, as token ids
    # the stand-in answers path (seed + index) % paths and lists choices in reverse: ours are back in index order
    paths = load_guide("code").paths()
    assert out[0] == [load_guide("code").render(paths[(10 + i) % len(paths)], [f"Step {10 + i} with care."] * 8)
                      for i in range(3)]
    for text in out[0] + out[1]:
        parse_workflow(text, family="code")
    assert gen.stats.generated_tokens > 0 and gen.stats.batch_sizes == [6]


@pytest.mark.parametrize("family", ["code", "math", "qa"])
def test_guided_segments_ask_only_for_choices_and_instructions(tiny_model, tmp_path, record, family):
    """guided="segments" (the default): the client walks the grammar; requests carry a choice's alternation or an
    instruction's pattern, the prompt grows by the forced text, and every result is in the grammar's language."""
    import re

    from spogw.models import load_tokenizer
    from spogw.workflows.guide import SLOT_TEXT, load_guide
    from spogw.workflows.parsing import parse_workflow

    guide = load_guide(family)
    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, backend="engine", engine=engine)
        arrived = []
        out = gen.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=1000, seed=[3, 4], guide=family,
                           on_prompt=lambda i, texts: arrived.append(i))
    assert sorted(arrived) == [0, 1] and [len(group) for group in out] == [4, 4]
    pattern = re.compile(guide.regex())
    for text in out[0] + out[1]:
        assert pattern.fullmatch(text), text
        parse_workflow(text, family=family)
    assert len({t for group in out for t in group}) > 2  # different choices per row (seeded per request)
    sent = requests(record, "/v1/completions")
    slot = f'{SLOT_TEXT}{{1,{guide.slot_chars}}}"'
    assert {b["structured_outputs"]["regex"] for b in sent if not b["structured_outputs"]["regex"].startswith("(?:")} \
        == {slot}
    assert all(b["n"] == 1 and b["max_tokens"] <= guide.slot_tokens + 1 for b in sent)
    tok = load_tokenizer(tiny_model)
    header = tok(guide.prefix, add_special_tokens=False)["input_ids"]
    first = sent[0]["prompt"]
    assert first[-len(header):] == header  # the forced header is prompt, not decoded
    assert len({b["seed"] for b in sent}) == len(sent)
    # the workflow carries the tokens the model saw: what it sampled plus the forced segments, encoded one by one;
    # every request's prompt is the chat prompt followed by a prefix of one row's tokens
    rows = [list(t.token_ids) for group in out for t in group]
    for text in out[0] + out[1]:
        assert text.token_ids and "".join(tok.decode([i]) for i in text.token_ids) == text
    assert all(b["return_token_ids"] for b in sent)
    chats = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for m in PROMPTS]
    assert chats[0] == first[:len(first) - len(header)]

    def continues_a_row(prompt):
        return any(prompt[:len(c)] == c and any(row[:len(prompt) - len(c)] == prompt[len(c):] for row in rows)
                   for c in chats)

    assert all(continues_a_row(b["prompt"]) for b in sent)
    # a row cut off by max_new_tokens is left unfinished (and so fails validation), not padded into shape
    with open_engine(options(), tiny_model, tmp_path) as engine:
        short = make_generator(tiny_model, backend="engine", engine=engine).generate(
            PROMPTS[:1], n=1, max_new_tokens=120, guide=family)[0][0]
    assert not pattern.fullmatch(short)


def test_adapters_are_loaded_at_run_time_and_requests_name_them(tiny_model, tmp_path, record):
    first, second = write_adapter(tmp_path / "a1"), write_adapter(tmp_path / "a2")
    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, first, backend="engine", engine=engine)
        assert gen.identity.endswith(f"+{Path(first).resolve()}")
        with_first = gen.generate(PROMPTS[:1], max_new_tokens=8)
        gen.generate(PROMPTS[:1], max_new_tokens=8)  # loaded once
        gen.set_adapter(second)
        with_second = gen.generate(PROMPTS[:1], max_new_tokens=8)
        gen.set_adapter(None)
        base = gen.generate(PROMPTS[:1], max_new_tokens=8)
        with pytest.raises(ValueError, match="rank 32, above `--engine.max_lora_rank 16`"):
            gen.set_adapter(write_adapter(tmp_path / "big", r=32))
        # the next iteration's generator (a new one, same server) loads its adapter beside the first's, and one
        # that names an adapter the server already holds uses it
        later = make_generator(tiny_model, second, backend="engine", engine=engine)
        again = later.generate(PROMPTS[:1], max_new_tokens=8)
        third = make_generator(tiny_model, first, backend="engine", engine=engine)
        first_again = third.generate(PROMPTS[:1], max_new_tokens=8)
    from spogw.generation.server import _adapter_key

    one, two = (f"adapter-{_adapter_key(str(Path(a).resolve()))}" for a in (first, second))
    assert one != two
    loads = requests(record, "/v1/load_lora_adapter")
    assert [(b["lora_name"], b["lora_path"]) for b in loads] == [
        (one, str(Path(first).resolve())), (two, str(Path(second).resolve())), (two, str(Path(second).resolve())),
        (one, str(Path(first).resolve()))]
    assert [b["lora_name"] for b in requests(record, "/v1/unload_lora_adapter")] == [one]
    assert [b["model"] for b in requests(record, "/v1/completions")] == [one, one, two, "base", two, one]
    assert one in with_first[0][0] and two in with_second[0][0] and "base" in base[0][0]
    assert two in again[0][0] and one in first_again[0][0]


def test_a_server_dying_mid_call_is_named_then_restarted_once(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STANDIN_DIE_AFTER", "2")
    adapter = write_adapter(tmp_path / "adapter")
    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, adapter, backend="engine", engine=engine)
        with pytest.raises(EngineUnavailable, match=r"died \(killed by SIGKILL") as err:
            gen.generate(PROMPTS * 3, n=2, max_new_tokens=8)
        assert "EngineCore died (staged)" in str(err.value)  # the log's tail
        dead = engine.pid
        monkeypatch.setenv("STANDIN_DIE_AFTER", "0")
        engine.recover(str(err.value))
        assert engine.available and engine.pid != dead and engine.restarts == 1
        again = gen.generate(PROMPTS, n=2, max_new_tokens=8)  # the new server gets the adapter loaded again
        assert len(again) == 2 and "adapter-" in again[0][0] and gen._count == 2  # loaded a second time
        engine.stop()  # a second death falls back instead of restarting
        engine.recover("the vLLM server died again")
        assert not engine.available and make_generator(tiny_model, backend="engine", engine=engine).identity.startswith(
            "transformers:")
    assert "restarting it" in capsys.readouterr().err


def test_garbage_answers_are_named(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_GARBAGE", "1")
    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, backend="engine", engine=engine)
        with pytest.raises(EngineUnavailable, match="answered garbage"):
            gen.generate(PROMPTS, max_new_tokens=8)


def test_the_executor_is_the_openai_client_on_the_engine_with_its_options(tmp_path, record):
    opts = ExecutorOptions(kind="engine", model=str(tmp_path), timeout_s=7.0, max_retries=1, concurrency=3)
    with open_engine(options(dtype="float32"), str(tmp_path), tmp_path) as engine:
        executor = make_executor(opts, tmp_path, engine)
        backend = executor.executor
        assert type(backend).__name__ == "OpenAIExecutor" and backend.base_url == engine.url
        assert (backend.timeout_s, backend.max_retries, backend.concurrency) == (7.0, 1, 3)
        assert executor.identity == f"engine:{tmp_path}:float32"  # dtype in the cache key

        async def ask():
            try:
                return await executor.chat([{"role": "user", "content": "hello there"}], max_tokens=16)
            finally:
                await executor.aclose()

        reply = asyncio.run(ask())
    assert reply.ok and reply.text == "echo from base: hello there" and reply.completion_tokens > 0
    assert requests(record, "/v1/chat/completions")[0]["max_tokens"] == 16


def test_executor_options_are_checked():
    for kwargs, flag in (({"timeout_s": 0}, "--executor.timeout_s"), ({"max_retries": -1}, "--executor.max_retries"),
                         ({"concurrency": 0}, "--executor.concurrency")):
        with pytest.raises(ValueError, match=flag):
            ExecutorOptions(**kwargs)


def test_the_sample_stage_through_the_engine_writes_queries_as_they_arrive_and_resumes(tiny_model, tmp_path):
    from spogw.benchmarks import load_benchmark
    from spogw.sampling import SamplingOptions, read_jsonl_tolerant, sample

    records = load_benchmark("humaneval", "train", limit=3)
    opts = SamplingOptions(m=2, guided=True, max_resample=0, backend="engine")
    out = tmp_path / "samples.jsonl"
    with open_engine(options(), tiny_model, tmp_path) as engine:
        gen = make_generator(tiny_model, backend="engine", engine=engine)
        calls = []
        real = gen.generate
        gen.generate = lambda prompts, **kw: calls.append(len(prompts)) or real(prompts, **kw)
        stats = sample(records[:2], out, generator=gen, options=opts, seed=0)
        assert calls == [2] and stats["valid"] == 4  # both queries in one call
        first = read_jsonl_tolerant(out)
        stats = sample(records, out, generator=gen, options=opts, seed=0)  # resumes: only the third query
        assert calls == [2, 1] and stats["samples"] == 6
    lines = read_jsonl_tolerant(out)
    assert lines[:4] == first and all(line["generator"] == gen.identity for line in lines)


def test_spogw_sample_on_the_engine_end_to_end_stops_its_server(tiny_model, tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "spogw.cli", "sample", "--benchmark", "humaneval", "--out", str(out), "--limit", "2",
           "--generator", tiny_model, "--sampling.m", "2", "--sampling.guided", "true", "--sampling.backend", "engine",
           "--engine.command", json.dumps([sys.executable, STANDIN])]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "starting vLLM" in done.stderr and json.loads(done.stdout)["valid"] == 4
    log = (tmp_path / "engine" / "server.log").read_text()
    pid = int(log.split("engine core pid ")[1].split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the server's engine-core child outlived `spogw sample`"
