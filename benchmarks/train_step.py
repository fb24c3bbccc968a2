"""Training-step benchmark: spogw's ioGRPO-mKL step against TRL's GRPOTrainer step and against the floor.

What is measured (issue: "Benchmarks"): response tokens per second of one training step and the
peak memory, on the same small model, batch, sequence lengths and LoRA settings:

* model SmolLM2-135M-Instruct (``spogw.models``, float32 weights), bf16 autocast, 2 torch threads;
* LoRA r = 16, alpha = 32, dropout 0 on q/k/v/o_proj; beta = 0.1 (so a reference is needed);
* one group: one prompt of exactly 128 random ordinary tokens and 8 completions of exactly 128
  (no EOS inside), fixed rewards 0/1 (advantages +-0.94), fixed seed; 8 x 128 = 1,024 response tokens.

Sides, each in its own subprocess so its peak RSS is its own (``--sides``; default ours, floor, trl):

* ``ours``     ``spogw.module.SPOGWModule``: ``training_step`` + backward + AdamW step, old/reference
               log-probs attached to the batch (computed once per iteration: the data is offline).
               The one-off reference pass (``module.reference_logps``) is timed separately, before
               each step (its result is dropped: the batch keeps the first one).
* ``floor``    the issue's floor: a plain peft forward + backward, log-probs only at completion
               positions, reference computed beforehand, no loss extras (+ the AdamW step).
* ``trl``      a real ``trl.GRPOTrainer`` step (GRPOConfig defaults, so gradient checkpointing on),
               generation replaced by a fixed ``rollout_func``; reference forward, advantages, loss,
               backward, clipping and AdamW run as in training (see ``_trl_side.py``).
* ``ours-gc``  ``ours`` with the module's ``gradient_checkpointing=True``: less memory, one more forward.
* ``trl-nogc`` TRL with ``gradient_checkpointing=False``: shows how much of TRL's time is the
               recomputation and how much is the per-step reference pass and the full-position head.

Timing on a shared machine: all sides are loaded at once, then step one at a time in rotating order,
round after round, so a burst of load from other programs hits every side alike. Before each step the
parent waits (up to ``--max-wait`` s) for the machine to be quiet; during it, it books how many cores
the *rest* of the machine used (from ``/proc/stat`` minus the worker's own CPU time). A step during which others
used fewer than ``--noise-cores`` cores is *clean*. Rounds go on until every side has ``--steps``
clean steps after ``--warmup`` rounds (or ``--max-rounds``). Reported: the median over clean steps
(all timed steps when none was clean), the fastest step, and the CPU seconds per step. tokens/s =
1,024 / step time. Peak memory is the process's peak RSS (``ru_maxrss``, model loading included) and
the peak during the steps alone (``VmHWM`` reset before the first step).

Run: ``python benchmarks/train_step.py`` (4–5 minutes on an idle 2-core machine, 10–25 when it is
busy; ``--sides ours,floor`` for a quick look; ``--json FILE`` keeps the raw figures). Figures and
analysis: ``notes/bench-train.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the private helpers next to this file

from _common import Settings, emit, quiet, settings_from_json, settings_to_json, setup_torch  # noqa: E402

SIDES = ("ours", "floor", "trl", "ours-gc", "trl-nogc")
DEFAULT_SIDES = ("ours", "floor", "trl")  # each further side adds 2-5 GiB while all sides are resident at once
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def run_side(side: str, settings: Settings) -> dict:
    """Measure one side in this process."""
    quiet()
    setup_torch(settings)
    if side in ("ours", "ours-gc"):
        from _ours_side import run_ours

        return run_ours(settings, gradient_checkpointing=side == "ours-gc")
    if side == "floor":
        from _floor_side import run_floor

        return run_floor(settings)
    from _trl_side import run_trl

    return run_trl(settings, gradient_checkpointing=side == "trl")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_until_quiet(limit_cores: float, max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) for half a second in which other programs used < ``limit_cores``; return it."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy, t0 = machine_busy_s(), time.monotonic()
        time.sleep(0.5)
        others = (machine_busy_s() - busy) / (time.monotonic() - t0)
        if others < limit_cores or time.monotonic() > deadline:
            return others


class Worker:
    """One side measured in its own subprocess, stepping only when told to (see ``_common.wait_for_go``)."""

    def __init__(self, side: str, settings: Settings, log_dir: Path):
        self.side = side
        self.steps: list[dict] = []
        self.log = log_dir / f"{side}.stderr"
        cmd = [sys.executable, __file__, "--side", side, "--settings", settings_to_json(settings)]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         bufsize=1)

    def _expect(self, prefix: str) -> str:
        """Read stdout up to the next line starting with ``prefix`` (other lines are the side's own prints)."""
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.proc.wait()
        tail = "\n".join(self.log.read_text().splitlines()[-30:])
        raise RuntimeError(f"side {self.side!r} exited ({self.proc.returncode}) before {prefix.strip()}:\n{tail}")

    def _send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def step(self, settings: Settings) -> dict:
        """Run one step; book how many cores the rest of the machine used meanwhile (``noise_cores``)."""
        self._expect("READY")
        before_quiet = wait_until_quiet(settings.noise_cores, max_wait_s=settings.max_wait)
        busy, mine, t0 = machine_busy_s(), process_cpu_s(self.proc.pid), time.monotonic()
        self._send("go")
        figures = json.loads(self._expect("STEP "))
        wall = time.monotonic() - t0
        others = (machine_busy_s() - busy) - (process_cpu_s(self.proc.pid) - mine)
        figures.update(noise_cores=max(0.0, others / wall), quiet_before=before_quiet)
        self.steps.append(figures)
        return figures

    def result(self) -> dict:
        self._expect("READY")
        self._send("done")
        result = json.loads(self._expect("RESULT "))
        self.proc.wait()
        return result


def summarise(worker: Worker, settings: Settings) -> dict:
    """Medians over the clean timed steps (all timed steps when none was clean)."""
    timed = worker.steps[settings.warmup:]
    clean = [s for s in timed if s["noise_cores"] < settings.noise_cores]
    used = clean or timed
    out = {
        "step_s": statistics.median(s["step_s"] for s in used),
        "min_step_s": min(s["step_s"] for s in timed),
        "cpu_s": statistics.median(s["cpu_s"] for s in used),
        "clean": len(clean), "timed": len(timed), "steps": timed,
    }
    if "ref_s" in used[0]:
        out["ref_s"] = statistics.median(s["ref_s"] for s in used)
    if "sections" in used[0]:
        names = list(dict.fromkeys(n for s in used for n in s["sections"]))
        out["sections_s"] = {n: statistics.median(s["sections"].get(n, 0.0) for s in used) for n in names}
    return out


def run_round_robin(sides: list[str], settings: Settings) -> dict[str, dict]:
    """Start every side at once, then let them step one at a time, in rotating order, round after round.

    Rounds go on until every side has ``settings.steps`` clean timed steps (the rest of the machine
    used < ``noise_cores`` cores meanwhile) or ``max_rounds`` is reached.
    """
    with tempfile.TemporaryDirectory(prefix="bench-train-") as log_dir:
        workers = [Worker(side, settings, Path(log_dir)) for side in sides]
        try:
            for i in range(settings.max_rounds):
                order = workers[i % len(workers):] + workers[:i % len(workers)]
                done = []
                for w in order:
                    f = w.step(settings)
                    done.append(f"{w.side} {f['step_s']:.2f} s (others {f['noise_cores']:.1f} cores)")
                print(f"  round {i + 1}{' (warm-up)' if i < settings.warmup else ''}: {', '.join(done)}", flush=True)
                clean = [sum(s["noise_cores"] < settings.noise_cores for s in w.steps[settings.warmup:])
                         for w in workers]
                if min(clean) >= settings.steps:
                    break
            results = {w.side: {**w.result(), **summarise(w, settings)} for w in workers}
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.kill()
    return results


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "transformers", "peft", "trl", "lightning")
    return ", ".join(f"{n} {version(n)}" for n in names)


def fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def print_table(results: dict[str, dict], settings: Settings) -> None:
    tokens = settings.response_tokens
    print(f"\n{'side':<9} {'step s':>7} {'tokens/s':>8} {'min s':>6} {'cpu s':>6} {'ref pass s':>10} "
          f"{'peak RSS GiB':>12} {'in steps':>8} {'clean':>6}  timed steps (s)")
    for side, r in results.items():
        ref = f"{r['ref_s']:.2f}" if "ref_s" in r else "-"
        steps = " ".join(f"{s['step_s']:.2f}{'' if s['noise_cores'] < settings.noise_cores else '*'}"
                         for s in r["steps"])
        print(f"{side:<9} {r['step_s']:>7.2f} {tokens / r['step_s']:>8.0f} {r['min_step_s']:>6.2f} "
              f"{r['cpu_s']:>6.2f} {ref:>10} {fmt_gib(r['peak_rss']):>12} {fmt_gib(r['peak_rss_steps']):>8} "
              f"{r['clean']:>3}/{r['timed']:<2}  {steps}")
    print(f"(step s, cpu s, ref pass s: medians over the clean steps; * = a step during which other programs used "
          f">= {settings.noise_cores} cores)")


def print_ratios(results: dict[str, dict]) -> None:
    for name in ("ours", "ours-gc"):
        if name in results:
            print()
            ratios_of(name, results[name], results)


def ratios_of(name: str, ours: dict, results: dict[str, dict]) -> None:
    for base in ("trl", "trl-nogc"):
        if base not in results:
            continue
        trl, pair = results[base], f"{name} / {base}"
        print(f"{pair:<19} tokens/s      {trl['step_s'] / ours['step_s']:5.2f}x   (goal >= 2 vs trl)")
        print(f"{pair:<19} tokens/s min  {trl['min_step_s'] / ours['min_step_s']:5.2f}x   (fastest step of each)")
        print(f"{pair:<19} peak RSS      {ours['peak_rss'] / trl['peak_rss']:5.2f}    (goal <= 1 vs trl)")
        if ours.get("peak_rss_steps") and trl.get("peak_rss_steps"):
            print(f"{pair:<19} RSS in steps  {ours['peak_rss_steps'] / trl['peak_rss_steps']:5.2f}")
        # An epoch that sees every group once pays the reference pass on every step.
        print(f"{pair:<19} tokens/s +ref {trl['step_s'] / (ours['step_s'] + ours['ref_s']):5.2f}x   "
              "(reference pass paid every step, as in a single epoch)")
    if "floor" in results:
        floor, pair = results["floor"], f"{name} / floor"
        print(f"{pair:<19} step time     {ours['step_s'] / floor['step_s']:5.2f}    (goal <= 1.2)")
        print(f"{pair:<19} time, min     {ours['min_step_s'] / floor['min_step_s']:5.2f}    (fastest step of each)")
        print(f"{pair:<19} peak RSS      {ours['peak_rss'] / floor['peak_rss']:5.2f}")


def print_sections(results: dict[str, dict]) -> None:
    for side in ("ours", "ours-gc", "floor"):
        if side in results and "sections_s" in results[side]:
            parts = results[side]["sections_s"]
            total = sum(parts.values())
            print(f"\nwhere {side}'s step goes (median s per section; sum {total:.2f} s):")
            for name, s in parts.items():
                print(f"  {name:<32} {s:6.3f}  {100 * s / total:4.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                        help=f"comma-separated subset of {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="clean timed steps wanted per side")
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed rounds first")
    parser.add_argument("--max-rounds", type=int, default=Settings.max_rounds, help="stop after this many rounds")
    parser.add_argument("--noise-cores", type=float, default=Settings.noise_cores,
                        help="a step is clean when other programs used fewer cores than this meanwhile")
    parser.add_argument("--max-wait", type=float, default=Settings.max_wait,
                        help="seconds to wait for a quiet machine before each step")
    parser.add_argument("--threads", type=int, default=Settings.threads, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: measure one side here
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        emit(run_side(args.side, settings_from_json(args.settings)))
        return
    settings = Settings(steps=args.steps, warmup=args.warmup, max_rounds=max(args.max_rounds, args.warmup + 1),
                        noise_cores=args.noise_cores, max_wait=args.max_wait, threads=args.threads)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")

    started = time.time()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {versions()}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; {settings.threads} threads; "
          f"{settings.group} x ({settings.prompt_len} prompt + {settings.completion_len} completion) tokens, "
          f"LoRA r={settings.lora_r} on q/k/v/o, beta={settings.beta}, bf16 autocast; "
          f"median of up to {settings.steps} clean steps after {settings.warmup} warm-up round(s)")
    results = run_round_robin(sides, settings)
    print_table(results, settings)
    print_ratios(results)
    print_sections(results)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; whole run {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings.__dict__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
