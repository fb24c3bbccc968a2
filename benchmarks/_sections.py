"""Where a training step's time goes: a running clock split at marks and at module forward hooks.

``Sections(causal_lm)`` hooks the transformer backbone (``causal_lm.model``) and the LM head
(``causal_lm.lm_head``): during the forward phase of a step, time spent inside them is booked as
``forward: backbone`` and ``forward: LM head``, and time between them as ``forward: other``. The
caller books the rest with :meth:`mark` (``backward``, ``optimizer``, ...). The hooks only book during
the forward phase, so a backward that recomputes activations (gradient checkpointing) is not
mistaken for forward time. The clock reads ``time.perf_counter``: it costs microseconds, not a profiler.
"""

from __future__ import annotations

import time
from collections import defaultdict


class Sections:
    def __init__(self, causal_lm):
        self._current: dict[str, float] | None = None
        self._last = 0.0
        self._forward = False
        for name, module in (("backbone", causal_lm.model), ("LM head", causal_lm.lm_head)):
            module.register_forward_pre_hook(lambda *_: self._hook("forward: other"))
            module.register_forward_hook(lambda *_, name=name: self._hook(f"forward: {name}"))

    def _hook(self, name: str) -> None:
        if self._forward:
            self.mark(name)

    def begin(self) -> None:
        self._current = defaultdict(float)
        self._forward = True
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """Book the time since the previous mark under ``name``; a name that is not forward ends the forward."""
        if self._current is None:
            return
        now = time.perf_counter()
        self._current[name] += now - self._last
        self._last = now
        if not name.startswith("forward"):
            self._forward = False

    def end(self) -> dict[str, float]:
        """The step's seconds per section."""
        step = dict(self._current or {})
        self._current = None
        self._forward = False
        return step
