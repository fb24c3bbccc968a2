"""The quickstart loop, timed: wall time per stage, and the generator's tokens/s against transformers' generate.

Part 1 runs ``spogw iterate --config configs/quickstart.yaml`` into a fresh run directory (or reads a finished
one with ``--from-run``) and prints the wall time of each stage (sample, score, build, fit, evaluate) from
the run's own records (``summary.json``, ``iter-*/fit/fit.done.json``, the dataset's ``stats.json``), with the
sample stage's generator throughput.

Part 2 measures the generator side by side on the same prompts (HumanEval training queries through the code
family's generation prompt, the embedded SmolLM2-135M, m rows per query, same temperature), one query at a
time, the three sides in a rotating order so that machine noise hits all alike (a short untimed warm-up
first):

(a) the peer: transformers ``model.generate`` on the m copies of the prompt (left-padded batch, KV cache),
    asked for exactly as many new tokens per row as our guided workflows have (``min_new_tokens``);
(b) ours, guided (``spogw.workflows.guided_decoding.guided_generate``): one prefill shared by the m rows, forced runs of
    the workflow grammar fed in one padded pass;
(c) ours with forced runs fed one token per pass (``max_run=1``), to show where the time goes.

Tokens/s counts completion tokens (forced and sampled alike) per second of wall time. Run:
``python benchmarks/quickstart.py`` (about 17 minutes on 2 cores; ``--skip-loop`` for part 2 only, about 6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_loop(run_dir: Path, config: str) -> float:
    cmd = [sys.executable, "-m", "spogw.cli", "iterate", "--config", config, "--run_dir", str(run_dir)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def stage_times(run_dir: Path) -> list[tuple[str, float, str]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for it in summary["iterations"]:
        k = it["iteration"]
        sample, score = it["sample"], it["score"]
        rows.append((f"iter {k} sample", sample["seconds"],
                     f"{sample['valid']}/{sample['samples']} valid workflows, generator "
                     f"{sample.get('generated_tokens_per_s', float('nan')):.0f} tok/s"))
        executor = score.get("executor", {})
        rows.append((f"iter {k} score", score["seconds"],
                     f"{score['scored']} runs, {executor.get('calls', 0)} executor calls "
                     f"({executor.get('cached_calls', 0)} cached), mean score {score.get('score_mean', 0):.3f}"))
        build = it.get("build") or {}
        build_s = build.get("seconds") or 0.0
        rows.append((f"iter {k} build", build_s, f"{build.get('groups')} groups"))
        rows.append((f"iter {k} fit", it["fit_seconds"] - build_s, "LoRA training (subprocess start included)"))
    if "evaluation_seconds" in summary:
        rows.append(("evaluate", summary["evaluation_seconds"], "generator + io baseline on the test queries"))
    return rows


def generator_sides(queries: int, m: int, temperature: float, seed: int) -> None:
    import torch

    from spogw.benchmarks import load_benchmark
    from spogw.generation import generator_messages
    from spogw.models import load_causal_lm, load_tokenizer
    from spogw.workflows.guide import load_guide
    from spogw.workflows.guided_decoding import TokenGuide, guided_generate

    torch.set_num_threads(int(os.environ.get("SPOGW_BENCH_THREADS", "2")))
    tok = load_tokenizer("embedded")
    tok.padding_side = "left"
    model = load_causal_lm("embedded", dtype="float32").eval()
    guide = TokenGuide(load_guide("code"), tok)
    records = load_benchmark("humaneval", "train", limit=queries)
    totals = {"peer": [0, 0.0], "guided": [0, 0.0], "guided, one token per pass": [0, 0.0]}
    warm = tok.apply_chat_template(generator_messages("code", records[0].question), tokenize=False,
                                   add_generation_prompt=True)
    guided_generate(model, tok(warm, add_special_tokens=False)["input_ids"], guide, n=2, temperature=temperature,
                    top_p=0.95, max_new_tokens=1024, seed=seed)  # untimed: token tables, allocator
    for q, record in enumerate(records):
        text = tok.apply_chat_template(generator_messages("code", record.question), tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        texts, _ = guided_generate(model, ids, guide, n=m, temperature=temperature, top_p=0.95,
                                   max_new_tokens=1024, seed=seed + q)
        tokens = sum(len(guide.encode(t)) for t in texts)
        length = round(tokens / m)
        enc = tok([text] * m, return_tensors="pt", add_special_tokens=False)

        names = list(totals)
        for name in names[q % 3:] + names[:q % 3]:  # rotate the order: no side always runs first
            t0 = time.perf_counter()
            if name == "peer":
                torch.manual_seed(seed + q)
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=length, min_new_tokens=length, do_sample=True,
                                         temperature=temperature, top_p=0.95, top_k=None,
                                         pad_token_id=tok.pad_token_id)
                produced = (out.shape[1] - enc["input_ids"].shape[1]) * m
            else:
                guided_generate(model, ids, guide, n=m, temperature=temperature, top_p=0.95, max_new_tokens=1024,
                                seed=seed + q, max_run=64 if name == "guided" else 1)
                produced = tokens
            totals[name][1] += time.perf_counter() - t0
            totals[name][0] += produced
        print(f"  query {q + 1}/{len(records)}: prompt {len(ids)} tokens, {m} rows of ~{length} tokens", flush=True)
    peer = totals["peer"][0] / totals["peer"][1]
    print(f"\nGenerator, {len(records)} HumanEval queries x m={m} (SmolLM2-135M fp32, CPU):")
    print(f"  {'side':32s} {'tokens':>8s} {'seconds':>9s} {'tok/s':>8s} {'vs peer':>8s}")
    for name, (n_tokens, seconds) in totals.items():
        rate = n_tokens / seconds
        print(f"  {name:32s} {n_tokens:8d} {seconds:9.1f} {rate:8.1f} {rate / peer:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--from-run", help="read a finished run directory instead of running the loop")
    parser.add_argument("--skip-loop", action="store_true", help="only the generator comparison")
    parser.add_argument("--queries", type=int, default=6, help="queries for the generator comparison")
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not args.skip_loop:
        if args.from_run:
            run_dir, total = Path(args.from_run), None
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="spogw-quickstart-"))
            total = run_loop(run_dir, args.config)
        print(f"\nQuickstart loop ({args.config}), {run_dir}:")
        rows = stage_times(run_dir)
        for name, seconds, what in rows:
            print(f"  {name:16s} {seconds:8.1f} s   {what}")
        print(f"  {'stages':16s} {sum(r[1] for r in rows):8.1f} s")
        if total is not None:
            print(f"  {'wall, end to end':16s} {total:8.1f} s   (process start, model loads and W&B included)")
    generator_sides(args.queries, args.m, args.temperature, args.seed)


if __name__ == "__main__":
    main()
