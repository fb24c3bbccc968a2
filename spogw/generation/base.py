"""The one interface every generator backend implements, and the pieces they share.

Backends import this module and nothing of each other: :mod:`spogw.generation.hf` (transformers),
:mod:`spogw.generation.vllm_offline` (an in-process ``vllm.LLM``) and :mod:`spogw.generation.server` (the
vLLM OpenAI server that :mod:`spogw.engine` starts). :func:`spogw.generation.make_generator` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

OnPrompt = Callable[[int, list[str]], None]
"""``on_prompt(i, texts)``: called once prompt ``i``'s ``n`` completions are ready (before the call returns)."""


@runtime_checkable
class Generator(Protocol):
    """What the sample and evaluate stages need from a generator backend."""

    identity: str
    """Names the model, the backend and the adapter (recorded next to every generated workflow)."""

    def generate(self, prompts: list[list[dict]], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 512, seed: int | Sequence[int] = 0, guide: str | None = None,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_prompt: OnPrompt | None = None) -> list[list[str]]:
        """``n`` completions for each chat conversation in ``prompts``, in order.

        ``seed`` is one seed for the call (prompt ``i`` draws from ``seed * 1_000_003 + i``) or one seed per prompt;
        ``guide`` names a workflow family whose grammar constrains the completions (guided sampling,
        :mod:`spogw.workflows.guide`); ``on_batch(done_rows, total_rows)`` reports progress; ``on_prompt`` hands
        over each prompt's completions as soon as they are ready, so a caller can write them before the rest."""
        ...


def prompt_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per prompt: ``seed`` itself when it is a list, else ``seed * 1_000_003 + i``."""
    if isinstance(seed, int):
        return [seed * 1_000_003 + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"`seed` has {len(seeds)} values for {count} prompts")
    return seeds


def generator_messages(family: str, question: str) -> list[dict]:
    """The chat conversation that asks the generator for a workflow for ``question`` (a ``family`` problem)."""
    from spogw.workflows.families import generator_prompt

    return [{"role": "user", "content": generator_prompt(family, question)}]


@dataclass
class GenerationStats:
    """What the last calls cost: prompt and generated tokens, seconds, batches."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def record(self, *, prompt_tokens: int, generated_tokens: int, seconds: float, rows: int) -> None:
        """Add one batch."""
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.seconds += seconds
        self.batches += 1
        self.batch_sizes.append(rows)


def check_sampling(n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Reject sampling settings no backend can honour, naming the argument."""
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")


def adapter_rank(adapter) -> int:
    """The largest LoRA rank in a peft adapter directory (``r`` and any per-module ``rank_pattern``)."""
    import json
    from pathlib import Path

    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"`--adapter {adapter}`: no adapter_config.json there (expected the directory a "
                                "peft model's save_pretrained writes, e.g. <run_dir>/adapter)")
    config = json.loads(config_path.read_text())
    return max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM's kernels accept as ``max_lora_rank``."""
