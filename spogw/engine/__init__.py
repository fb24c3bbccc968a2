"""The inference engine: one vLLM OpenAI server per run, serving the executor and the generator (DESIGN §4).

* :mod:`spogw.engine.options` — :class:`EngineOptions` (``--engine.*``): dtype, port, KV cache, cores, LoRA rank.
* :mod:`spogw.engine.server` — :class:`EngineServer`: the process (launch, health wait, stop, adopt an orphan).
* :mod:`spogw.engine.process` — ports, process identity, state files, memory, log tails.
* :mod:`spogw.engine.session` — :func:`open_engine`: one server per run, signals, the transformers fallback.

The executor talks to it through :class:`spogw.runtime.executor.OpenAIExecutor` (``--executor.kind engine``),
the generator through :class:`spogw.generation.server.ServerGenerator` (``--sampling.backend engine``).
Everything here is standard library; vLLM runs in the server's own interpreter.
"""

from spogw.engine.options import EngineOptions
from spogw.engine.server import EngineServer, EngineUnavailable
from spogw.engine.session import Engine, active_engine, open_engine

__all__ = ["Engine", "EngineOptions", "EngineServer", "EngineUnavailable", "active_engine", "open_engine"]
