"""Shared pieces of the training-step benchmark: the fixed batch, the settings, timing and memory.

Every side of ``train_step.py`` (TRL, ours, the floor) builds its batch and its LoRA settings from
here, so the three measure exactly the same work.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

MODEL = "embedded"  # SmolLM2-135M-Instruct (spogw.models)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FIRST_ORDINARY_TOKEN = 17  # SmolLM2's ids 0..16 are special (<|endoftext|>, <|im_start|>, ...)


@dataclass
class Settings:
    """What one benchmark run measures; every side receives the same values."""

    group: int = 8  # completions per prompt = batch size
    prompt_len: int = 128
    completion_len: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    beta: float = 0.1
    lr: float = 1e-5
    threads: int = 2
    steps: int = 3  # timed steps per side (the median is reported), taken from "clean" rounds when possible
    warmup: int = 1  # untimed steps first
    max_rounds: int = 10  # give up waiting for clean rounds after this many
    noise_cores: float = 0.3  # a step is clean when the rest of the machine used less than this many cores
    max_wait: float = 20.0  # seconds to wait for a quiet machine before each step
    seed: int = 0

    @property
    def response_tokens(self) -> int:
        return self.group * self.completion_len


def setup_torch(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)


def fixed_batch(settings: Settings, vocab_size: int):
    """One prompt of ``prompt_len`` random ordinary tokens, ``group`` completions of ``completion_len``, rewards.

    Random ids keep every completion exactly ``completion_len`` long (no EOS inside). Rewards are a
    fixed mix of 0s and 1s so every advantage is non-zero and half the group is positive (mKL on).
    """
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(FIRST_ORDINARY_TOKEN, vocab_size, (settings.prompt_len,), generator=gen)
    completions = torch.randint(
        FIRST_ORDINARY_TOKEN, vocab_size, (settings.group, settings.completion_len), generator=gen
    )
    rewards = torch.tensor([float(i % 2) for i in range(settings.group)])
    return prompt, completions, rewards


def lora_config(settings: Settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )


def rss_now_bytes() -> int:
    """Current resident set size (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; True when it worked.

    Writing ``5`` to ``/proc/self/clear_refs`` does this on Linux >= 4.0. It lets us read the peak
    reached *during the steps* separately from the peak of model loading.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """RSS before the steps, peak RSS during them (``VmHWM`` after a reset) and the process's peak RSS."""

    def start(self) -> None:
        self.before = rss_now_bytes()
        self.reset_ok = reset_peak_rss()

    def report(self) -> dict:
        return {
            "rss_before_steps": self.before,
            "peak_rss_steps": hwm_bytes() if self.reset_ok else None,
            "peak_rss": peak_rss_bytes(),
        }


class Clock:
    """Wall-clock and CPU seconds (this process, all threads) of one interval."""

    def __enter__(self) -> Clock:
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


def wait_for_go() -> bool:
    """Tell the parent this side is ready for a step and block until it answers: True = step, False = stop.

    The parent runs every side in its own process at once but lets only one step run at a time,
    taking the sides in turn, so load from other programs on the machine falls on all sides alike.
    """
    print("READY", flush=True)
    answer = sys.stdin.readline().strip()
    if answer not in ("go", "done"):
        raise SystemExit("the parent process went away")
    return answer == "go"


def report_step(**figures) -> None:
    print("STEP " + json.dumps(figures), flush=True)


def emit(result: dict) -> None:
    """Print one side's result as the last line of stdout, tagged so the parent can find it."""
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()


def settings_from_json(text: str) -> Settings:
    return Settings(**json.loads(text))


def settings_to_json(settings: Settings) -> str:
    return json.dumps(asdict(settings))


def quiet() -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
