"""The LLM backends a stage runs on: the executor's and the generator's options, and how they become objects.

:class:`ExecutorOptions` (``--executor.*``) and :class:`GenerationOptions` (``--generation.*``) are shared by the
score stage, the evaluate stage and `spogw iterate`; :func:`make_executor` turns the executor's into an
:class:`spogw.runtime.executor.Executor` behind the response cache, and :func:`engines_for` opens the run's engine
(:mod:`spogw.engine`) for the roles that use it. (They lived in ``spogw.evaluate``, which re-exports them.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spogw.engine.options import EngineOptions


@dataclass
class ExecutorOptions:
    """The executor LLM that runs every workflow (paper: GPT-4o-mini at temperature 0)."""

    kind: Literal["engine", "local", "openai"] = "engine"
    """engine: the run's vLLM server (spogw starts it; ``--engine.*``), falling back to local where vLLM cannot run;
    local: a transformers model in this process (batched); openai: any OpenAI-compatible endpoint."""
    model: str = "embedded"
    """Model name: a local model (``embedded`` = SmolLM2-135M-Instruct, a directory, a hub id) or the endpoint's."""
    base_url: str | None = None
    """openai: the endpoint (None = api.openai.com), e.g. http://127.0.0.1:8000/v1 for a server of your own."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable holding the API key."""
    temperature: float = 0.0
    """Sampling temperature of every executor call (paper: 0)."""
    max_tokens: int = 512
    """Most tokens per executor reply."""
    concurrency: int = 64
    """Workflows running at once, and executor calls in flight (a CPU server batches them; an API takes 64 easily)."""
    timeout_s: float = 300.0
    """engine/openai: seconds one call may take before it is retried (a CPU server at 64 concurrent calls takes up
    to ~50 s for 512 tokens; an API answers in seconds but may hang)."""
    max_retries: int = 4
    """engine/openai: retries of a call that failed on a timeout, a connection error, 408/409/429 or 5xx."""
    transport: Literal["openai", "lean"] = "openai"
    """engine/openai: the `openai` client, or bare aiohttp with the same retry policy (less CPU per call)."""
    max_batch: int = 8
    """local: most requests per batched generate."""
    dtype: str = "float32"
    """local: weights dtype (float32; bfloat16 is faster where the CPU or GPU supports it natively)."""
    price_in_per_m: float = 0.0
    """USD per 1M prompt tokens (gpt-4o-mini: 0.15), for the cost column."""
    price_out_per_m: float = 0.0
    """USD per 1M completion tokens (gpt-4o-mini: 0.60)."""
    cache: str | None = "auto"
    """Response cache file; ``auto`` = <out_dir>/executor_cache.sqlite; null = no cache."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"`--executor.timeout_s` must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"`--executor.max_retries` must be >= 0, got {self.max_retries}")
        if self.concurrency < 1:
            raise ValueError(f"`--executor.concurrency` must be >= 1, got {self.concurrency}")


@dataclass
class GenerationOptions:
    """How the generator writes the one workflow per test query."""

    backend: Literal["engine", "transformers", "vllm"] = "engine"
    """Generator backend: engine (the run's vLLM server, falling back to transformers where vLLM cannot run),
    transformers (in-process, CPU or GPU) or vllm (an in-process vllm.LLM)."""
    temperature: float = 0.0
    """0 = greedy: the generator's most likely workflow."""
    top_p: float = 1.0
    max_new_tokens: int = 768
    """Most tokens of a generated workflow."""
    batch_size: int = 8
    """Prompts per batched generate."""
    dtype: str = "float32"
    """transformers: weights dtype of the generator (float32, bfloat16, ...); the engine's is --engine.dtype."""
    guided: bool = False
    """Generate inside the family's workflow grammar (as ``--sampling.guided`` does for training queries)."""
    prompt_file: str | None = None
    """A text file replacing the generator prompt, as ``--sampling.prompt_file`` (the loop passes its own)."""


def make_executor(options: ExecutorOptions, out_dir: Path, engine=None):
    """The executor the options describe, behind the response cache unless ``cache`` is null.

    ``kind: engine`` needs the run's :class:`spogw.engine.Engine` (``engine``); where it fell back, the executor is
    the in-process transformers model (the engine printed why)."""
    from spogw.runtime.executor import LocalExecutor, OpenAIExecutor

    kind = options.kind
    if kind == "engine":
        if engine is None:
            raise ValueError("`--executor.kind engine` needs the run's engine (spogw.engine.open_engine)")
        kind = "openai" if engine.ready() is not None else "local"
    if kind == "local":
        backend = LocalExecutor(options.model, max_batch=options.max_batch, dtype=options.dtype)
    elif options.kind == "engine":
        from spogw.engine.server import SERVED_NAME

        backend = OpenAIExecutor(engine.url, SERVED_NAME, api_key_env="SPOGW_ENGINE_KEY", identity=engine.identity,
                                 concurrency=options.concurrency, timeout_s=options.timeout_s,
                                 max_retries=options.max_retries, transport=options.transport)
    else:
        backend = OpenAIExecutor(options.base_url, options.model, api_key_env=options.api_key_env,
                                 concurrency=options.concurrency, timeout_s=options.timeout_s,
                                 max_retries=options.max_retries, transport=options.transport,
                                 price_in_per_m=options.price_in_per_m, price_out_per_m=options.price_out_per_m)
    if options.cache is None:
        return backend
    from spogw.runtime.cache import CachedExecutor

    path = out_dir / "executor_cache.sqlite" if options.cache == "auto" else Path(options.cache)
    return CachedExecutor(backend, path)


@contextlib.contextmanager
def engines_for(executor: ExecutorOptions, backend: str, generator: str | None, options: EngineOptions,
                run_dir: Path):
    """``(executor's engine, generator's engine)`` for the stages that use one (None for the others): opened here
    (launched at once, waited for on first use) or found already open in this process, e.g. by `spogw iterate`."""
    from spogw.engine import open_engine

    with contextlib.ExitStack() as stack:
        exec_engine = gen_engine = None
        if executor.kind == "engine":
            exec_engine = stack.enter_context(open_engine(options, executor.model, run_dir))
        if backend == "engine" and generator is not None:
            gen_engine = stack.enter_context(open_engine(options, generator, run_dir))
        yield exec_engine, gen_engine
