"""The engine's options: one vLLM OpenAI server per run, and how it is started."""

from __future__ import annotations

import functools
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class EngineOptions:
    """The vLLM OpenAI server spogw starts and owns for a run: it serves the executor (``--executor.kind engine``)
    and the generator (``--sampling.backend engine``) on the same base model. Where vLLM is missing or cannot
    start, both fall back to the transformers backends with a one-line message (``fallback: false`` fails)."""

    dtype: Literal["native", "bfloat16", "float32", "float16", "auto"] = "native"
    """Weights and compute dtype. native (default): bfloat16 where the hardware computes it (a GPU, or a CPU
    with AMX or AVX-512 bf16), else float32; resolved when the options are made, so the records and the cache
    identity name the dtype that ran. bfloat16: ~2.5x float32's speed on a CPU with AMX/AVX-512 bf16, and several
    times *slower* on one without (emulated: ~80x slower matrix products; a warning says so); float32 reproduces
    the transformers backends' outputs exactly. auto: vLLM's choice from the model's config."""
    python: str | None = None
    """The interpreter that has vLLM. None: $SPOGW_ENGINE_PYTHON, else .venv-vllm/bin/python of the checkout or
    the working directory (`make install` builds it), else this interpreter if it can import vllm."""
    port: int | None = None
    """Loopback port of the server; None picks a free one."""
    kv_cache_gib: float | None = None
    """KV cache size; None: 20 % of the memory available at start, between 1 and 4 GiB (CPU)."""
    gpu_memory_utilization: float = 0.5
    """GPU machines: the fraction of GPU memory the server takes (the rest stays for the fit)."""
    max_model_len: int = 4096
    """Longest prompt + completion a request may have."""
    max_lora_rank: int = 16
    """Highest LoRA rank the generator's adapters may have (vLLM allows 1, 8, 16, 32, 64, 128, 256, ...)."""
    threads: str = "all"
    """CPU cores the server computes on: all = one compute thread per core this process may use, not pinned
    (VLLM_CPU_OMP_THREADS_BIND=nobind); pin = the same threads pinned to those cores; or a core list such as 0-3
    (pinned). vLLM's own default computes on one core of two. Pinning is fast on a machine of its own and ruinous
    on a shared one: beside another pinned vLLM, a pinned server here took 719 s to start instead of 118 s."""
    startup_timeout_s: float = 900.0
    """How long to wait for the server to answer before giving up (start-up is ~40-200 s on 2 CPU cores)."""
    reuse: bool = True
    """Adopt a server with the same settings that a killed earlier run left behind (instead of starting another);
    false stops such a server and starts a fresh one."""
    fallback: bool = True
    """Where the server cannot run, use the transformers backends (with a one-line message); false: fail."""
    extra_args: list[str] = field(default_factory=list)
    """More vLLM server flags, e.g. [--max-num-seqs, "64"]."""
    command: list[str] | None = None
    """The server program and its leading arguments, instead of `<python> -m vllm.entrypoints.openai.api_server`
    (the vLLM flags follow). For tests and other OpenAI-compatible servers."""

    def __post_init__(self) -> None:
        if self.dtype == "native":
            self.dtype = "bfloat16" if native_bf16() else "float32"
        elif self.dtype == "bfloat16" and not native_bf16():
            warnings.warn("`--engine.dtype bfloat16` on a CPU without AMX or AVX-512 bf16: vLLM emulates it, several "
                          "times slower than float32 here; pass `--engine.dtype native` (or float32)", stacklevel=2)
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"`--engine.port` must be in 1..65535 or null, got {self.port}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"`--engine.kv_cache_gib` must be > 0 or null, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"`--engine.gpu_memory_utilization` must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 64:
            raise ValueError(f"`--engine.max_model_len` must be >= 64, got {self.max_model_len}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"`--engine.startup_timeout_s` must be > 0, got {self.startup_timeout_s}")
        from spogw.generation.base import VLLM_LORA_RANKS

        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"`--engine.max_lora_rank` must be one of {', '.join(map(str, VLLM_LORA_RANKS))} "
                             f"(vLLM's LoRA kernels), got {self.max_lora_rank}")


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


@functools.cache
def native_bf16() -> bool:
    """Whether this machine computes bfloat16 natively: an NVIDIA GPU, or a CPU with AMX or AVX-512 bf16."""
    return has_gpu() or cpu_bf16()


def cpu_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags AMX or AVX-512 bf16 (Sapphire Rapids and later, Zen 4 and later). Elsewhere
    (AVX2-only CPUs; no /proc/cpuinfo, as on macOS) bf16 matrix products are emulated."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})
