"""Training-step benchmark: spogw's ioGRPO-mKL step against TRL's GRPOTrainer step and against the floor.

What is measured (issue: "Benchmarks"): response tokens per second of one training step and the
peak memory, on the same small model, batch, sequence lengths and LoRA settings:

* model SmolLM2-135M-Instruct (``spogw.models``, float32 weights), bf16 autocast, 2 torch threads;
* LoRA r = 16, alpha = 32, dropout 0 on q/k/v/o_proj; beta = 0.1 (so a reference is needed);
* one group: one prompt of exactly 128 random ordinary tokens and 8 completions of exactly 128
  (no EOS inside), fixed rewards 0/1 (advantages +-0.94), fixed seed; 8 x 128 = 1,024 response tokens.

Sides, each in its own fresh subprocess so its peak RSS is its own:

* ``ours``     ``spogw.module.SPOGWModule``: ``training_step`` + backward + AdamW step, old/reference
               log-probs attached to the batch (computed once per iteration: the data is offline).
               The one-off reference pass (``module.reference_logps``) is timed separately.
* ``floor``    the issue's floor: a plain peft forward + backward, log-probs only at completion
               positions, reference computed beforehand, no loss extras (+ the AdamW step).
* ``trl``      a real ``trl.GRPOTrainer`` step (GRPOConfig defaults, so gradient checkpointing on),
               generation replaced by a fixed ``rollout_func``; reference forward, advantages, loss,
               backward, clipping and AdamW run as in training (see ``_trl_side.py``).
* ``trl-nogc`` the same with ``gradient_checkpointing=False``: shows how much of TRL's time is the
               recomputation and how much is the per-step reference pass and the full-position head.

Times are wall-clock medians over ``--steps`` steps after ``--warmup`` untimed ones; tokens/s =
1,024 / step time. CPU seconds per step (all threads) are printed too: they move much less than wall
time when other processes share the cores. Peak memory is the process's peak RSS (``ru_maxrss``,
model loading included) and the peak during the steps alone (``VmHWM`` reset before the first step).

Run: ``python benchmarks/train_step.py`` (about 4 minutes on an idle 2-core machine; ``--sides
ours,floor`` for a quick look; ``--json FILE`` keeps the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the private helpers next to this file

from _common import Settings, emit, quiet, settings_from_json, settings_to_json, setup_torch  # noqa: E402

SIDES = ("ours", "floor", "trl", "trl-nogc")
GIB = 1 << 30


def run_side(side: str, settings: Settings) -> dict:
    """Measure one side in this process."""
    quiet()
    setup_torch(settings)
    if side == "ours":
        from _ours_side import run_ours

        return run_ours(settings)
    if side == "floor":
        from _floor_side import run_floor

        return run_floor(settings)
    from _trl_side import run_trl

    return run_trl(settings, gradient_checkpointing=side == "trl")


def spawn(side: str, settings: Settings) -> dict:
    """Measure one side in a fresh subprocess; its RESULT line comes back as a dict."""
    cmd = [sys.executable, __file__, "--side", side, "--settings", settings_to_json(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"side {side!r} failed (exit {proc.returncode}):\n{tail}")


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "transformers", "peft", "trl", "lightning")
    return ", ".join(f"{n} {version(n)}" for n in names)


def fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def print_table(results: dict[str, dict], settings: Settings) -> None:
    tokens = settings.response_tokens
    print(f"\n{'side':<9} {'step s':>7} {'tokens/s':>8} {'cpu s':>6} {'ref pass s':>10} {'peak RSS GiB':>12} "
          f"{'in steps':>8}  timed steps (s)")
    for side, r in results.items():
        ref = f"{r['ref_s']:.2f}" if "ref_s" in r else "-"
        steps = " ".join(f"{t:.2f}" for t in r["step_times_s"])
        print(f"{side:<9} {r['step_s']:>7.2f} {tokens / r['step_s']:>8.0f} {r['step_cpu_s']:>6.2f} {ref:>10} "
              f"{fmt_gib(r['peak_rss']):>12} {fmt_gib(r['peak_rss_steps']):>8}  {steps}")


def print_ratios(results: dict[str, dict]) -> None:
    ours = results.get("ours")
    if ours is None:
        return
    print()
    for base in ("trl", "trl-nogc"):
        if base in results:
            trl = results[base]
            print(f"ours / {base:<8} tokens/s      {trl['step_s'] / ours['step_s']:5.2f}x   (goal >= 2 vs trl)")
            print(f"ours / {base:<8} peak RSS      {ours['peak_rss'] / trl['peak_rss']:5.2f}    (goal <= 1 vs trl)")
            if ours.get("peak_rss_steps") and trl.get("peak_rss_steps"):
                print(f"ours / {base:<8} RSS in steps  {ours['peak_rss_steps'] / trl['peak_rss_steps']:5.2f}")
            print(f"ours / {base:<8} CPU s/step    {ours['step_cpu_s'] / trl['step_cpu_s']:5.2f}")
            # An epoch that sees every group once pays the reference pass on every step.
            first_epoch = ours["step_s"] + ours["ref_s"]
            print(f"ours+ref / {base:<4} tokens/s      {trl['step_s'] / first_epoch:5.2f}x   "
                  "(ref pass paid every step: a single epoch)")
    if "floor" in results:
        print(f"ours / floor    step time     {ours['step_s'] / results['floor']['step_s']:5.2f}    (goal <= 1.2)")
        print(f"ours / floor    CPU s/step    {ours['step_cpu_s'] / results['floor']['step_cpu_s']:5.2f}")


def print_sections(results: dict[str, dict]) -> None:
    for side in ("ours", "floor"):
        if side in results and "sections_s" in results[side]:
            parts = results[side]["sections_s"]
            total = sum(parts.values())
            print(f"\nwhere {side}'s step goes (median s per section; sum {total:.2f} s):")
            for name, s in parts.items():
                print(f"  {name:<32} {s:6.3f}  {100 * s / total:4.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=Settings.threads, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: measure one side here
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        emit(run_side(args.side, settings_from_json(args.settings)))
        return
    settings = Settings(steps=args.steps, warmup=args.warmup, threads=args.threads)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")

    started = time.time()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {versions()}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; {settings.threads} threads; "
          f"{settings.group} x ({settings.prompt_len} prompt + {settings.completion_len} completion) tokens, "
          f"LoRA r={settings.lora_r} on q/k/v/o, beta={settings.beta}, bf16 autocast; "
          f"median of {settings.steps} steps after {settings.warmup} warm-up")
    results = {}
    for side in sides:
        t0 = time.time()
        results[side] = spawn(side, settings)
        print(f"  {side}: {results[side]['step_s']:.2f} s/step ({time.time() - t0:.0f} s with loading), "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print_table(results, settings)
    print_ratios(results)
    print_sections(results)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; whole run {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings.__dict__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
