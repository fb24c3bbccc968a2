"""Generator backends: the LLM that writes workflows, behind one small interface (:mod:`spogw.generation.base`).

* ``transformers`` — :class:`spogw.generation.hf.TransformersGenerator`: in-process transformers (the fallback);
* ``engine`` — :class:`spogw.generation.server.ServerGenerator`: the run's vLLM server (:mod:`spogw.engine`),
  the previous iteration's adapter loaded at run time, guided sampling through structured outputs;
* ``vllm`` — :class:`spogw.generation.vllm_offline.VLLMGenerator`: an in-process ``vllm.LLM``.

Each backend imports only :mod:`spogw.generation.base`; :func:`make_generator` picks one by name and is the
only place that knows them all. The prompt that asks for a workflow is data
(``spogw/workflows/prompts/generator.yaml`` around the family's operators and template).
"""

from __future__ import annotations

from spogw.generation.base import GenerationStats, Generator, check_sampling, generator_messages, prompt_seeds
from spogw.generation.hf import TransformersGenerator

BACKENDS = ("transformers", "engine", "vllm")

__all__ = ["BACKENDS", "GenerationStats", "Generator", "TransformersGenerator", "check_sampling",
           "generator_messages", "make_generator", "prompt_seeds"]


def make_generator(model: str = "embedded", adapter: str | None = None, *, backend: str = "transformers",
                   engine=None, **options) -> Generator:
    """The generator backend by name.

    ``engine`` is the run's :class:`spogw.engine.Engine` for ``backend="engine"`` (its fallback, when the server
    cannot serve, is the transformers backend with ``options``); ``options`` are the backend's own keyword
    arguments (transformers: ``batch_size``, ``dtype``, ...)."""
    if backend == "transformers":
        return TransformersGenerator(model, adapter, **options)
    if backend == "engine":
        if engine is None:
            raise ValueError("`--sampling.backend engine` needs the run's engine (spogw.engine.open_engine)")
        if engine.ready() is None:  # fell back; the engine said why
            return TransformersGenerator(model, adapter, **options)
        from spogw.generation.server import ServerGenerator

        return ServerGenerator(engine, adapter)
    if backend == "vllm":
        from spogw.generation.vllm_offline import VLLMGenerator

        return VLLMGenerator(model, adapter, **options)
    raise ValueError(f"`--generation.backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
