"""The engine with a real vLLM server (slow; skipped where no interpreter with vLLM is found, see notes/engine.md):
the embedded SmolLM2-135M served in float32, guided sampling through structured outputs with a LoRA adapter loaded
at run time, and the executor's greedy answers equal to the in-process transformers executor's."""

from __future__ import annotations

import asyncio
import re

import pytest
from test_generation_vllm import make_adapter

from spogw.engine import EngineOptions, EngineUnavailable, open_engine
from spogw.engine.server import find_python


def _vllm_python() -> str | None:
    try:
        python = find_python(EngineOptions())
    except EngineUnavailable:
        return None
    import subprocess

    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    return python if probe.returncode == 0 else None


PYTHON = _vllm_python()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    PYTHON is None, reason="no interpreter with vLLM (`make engine` builds .venv-vllm on Linux x86-64)")]
OPTIONS = EngineOptions(dtype="float32", kv_cache_gib=1.0, max_model_len=2048, max_lora_rank=8)
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a Python function that adds two numbers."}]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with open_engine(OPTIONS, "embedded", tmp_path_factory.mktemp("run")) as engine:
        assert engine.ready() is engine, engine.reason
        yield engine


def test_guided_samples_through_a_runtime_adapter_are_valid_workflows(engine, tmp_path):
    from spogw.generation import generator_messages, make_generator
    from spogw.workflows.guide import load_guide
    from spogw.workflows.parsing import parse_workflow

    gen = make_generator("embedded", backend="engine", engine=engine)
    question = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    prompts = [generator_messages("code", question), generator_messages("code", "def neg(x):\n    return -x\n")]
    base = gen.generate(prompts, n=1, max_new_tokens=600, guide="code")
    plain = gen.generate(CHATS, max_new_tokens=12)
    gen.set_adapter(make_adapter(tmp_path / "adapter", seed=1))
    assert gen.generate(CHATS, max_new_tokens=12) != plain  # the adapter is in use
    sampled = gen.generate(prompts, n=4, temperature=1.0, top_p=0.95, max_new_tokens=600, seed=0, guide="code")
    pattern = re.compile(load_guide("code").regex())
    for text in [t for group in sampled + base for t in group]:
        assert pattern.fullmatch(text), text
        parse_workflow(text, family="code")
    assert all(len(set(group)) > 1 for group in sampled)
    assert gen.generate(prompts, n=4, temperature=1.0, top_p=0.95, max_new_tokens=600, seed=0, guide="code") == sampled


def test_the_float32_engine_answers_as_the_local_transformers_executor(engine, tmp_path):
    from spogw.evaluate import ExecutorOptions, make_executor

    async def answers(options) -> list[str]:
        executor = make_executor(options, tmp_path, engine)
        try:
            replies = await asyncio.gather(*(executor.chat(c, max_tokens=24) for c in CHATS))
        finally:
            await executor.aclose()
        assert all(r.ok for r in replies), replies
        return [r.text for r in replies]

    served = asyncio.run(answers(ExecutorOptions(kind="engine", cache=None)))
    local = asyncio.run(answers(ExecutorOptions(kind="local", dtype="float32", cache=None)))
    assert served == local
