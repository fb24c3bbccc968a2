"""The engine's speed goals (issue 13), both sides and the ratio in one run, on the embedded SmolLM2-135M-Instruct.

One vLLM server is started by spogw (``spogw.engine``, bfloat16 unless ``--dtype``), then:

1. **Executor**, completion tokens/s at concurrency c (default 64) on HumanEval code requests (the
   CustomCodeGenerate operator's prompt, greedy, ``--max-tokens`` each):
   * *raw engine*: bare aiohttp POSTs to the server's /v1/chat/completions, c in flight, no parsing beyond usage;
   * *spogw*: ``make_executor(kind=engine)`` (the ``openai`` client through spogw's executor, its retries and
     accounting; no response cache) with the same requests, c in flight;
   raw and spogw swap their halves of the prompts every round (prefix caching helps both alike);
   * *today's local executor* (transformers float32, batches of 16, the old default) on ``--local-requests``
     other requests per round (the server idles meanwhile);
   the three sides run in a rotating order each round, so that the machine's load hits them alike.
   Goals: spogw ≥ 0.85 × raw engine, and ≥ 5 × today's local executor.
2. **Generator**, guided sampling of the quickstart's workload (``--queries`` HumanEval training queries × m,
   the quickstart's prompt and grammar, temperature 0.8): the engine's server generator (every query in flight)
   against today's transformers guided decoder (float32), queries alternating sides. Tokens are counted the same
   way on both sides: the output texts re-tokenized (forced and sampled tokens alike). Goal: ≥ 4 × 83 tokens/s.
3. **The bf16 compute bound**: bf16 matrix products at batch 64 measured here (GFLOP/s), divided by 2 × the
   model's parameters per token: the most tokens/s any engine could decode at 64 sequences.

Run: ``python benchmarks/engine.py`` (~10 minutes on 2 cores); ``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# as `make` exports for every target: OpenMP threads that spin while they wait made torch several times slower
# whenever another process shared the cores (it is set before torch loads, for both sides and the server)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
GOALS = {"spogw / raw": 0.85, "spogw / local": 5.0, "generator": 4 * 83.0}


def executor_chats(n: int, limit_offset: int = 0) -> list[list[dict]]:
    import yaml

    from spogw.benchmarks import load_benchmark

    template = yaml.safe_load((REPO / "spogw/workflows/prompts/operators.yaml").read_text())["CustomCodeGenerate"]
    records = load_benchmark("humaneval", "train")
    chats = []
    for i in range(n):
        r = records[(i + limit_offset) % len(records)]
        text = template["prompt"].format(instruction="Think step by step, then write the code.", problem=r.question,
                                         entry_point=r.entry_point)
        chats.append([{"role": "user", "content": text + ("" if i < len(records) else f"\n(variant {i})")}])
    return chats


async def raw_side(url: str, chats, c: int, max_tokens: int) -> tuple[int, float]:
    import aiohttp

    limit = asyncio.Semaphore(c)
    tokens = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async def one(chat) -> None:
            nonlocal tokens
            async with limit:
                body = {"model": "base", "messages": chat, "temperature": 0.0, "max_tokens": max_tokens}
                async with session.post(f"{url}/chat/completions", json=body) as resp:
                    data = await resp.json()
            tokens += data["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(chat) for chat in chats))
        return tokens, time.perf_counter() - start


async def spogw_side(executor, chats, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    replies = await asyncio.gather(*(executor.chat(chat, max_tokens=max_tokens) for chat in chats))
    elapsed = time.perf_counter() - start
    failed = [r.error for r in replies if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} executor calls failed, e.g. {failed[0]}")
    return sum(r.completion_tokens for r in replies), elapsed


def executor_part(engine, args) -> dict[str, float]:
    from spogw.evaluate import ExecutorOptions, make_executor
    from spogw.runtime.executor import LocalExecutor

    chats = executor_chats(args.requests * 2)
    halves = [chats[::2], chats[1::2]]
    local_chats = executor_chats(args.local_requests * args.rounds, limit_offset=7)
    totals = {"raw engine": [0, 0.0], "spogw": [0, 0.0], "local (today)": [0, 0.0]}
    options = ExecutorOptions(kind="engine", concurrency=args.concurrency, cache=None)
    local = LocalExecutor("embedded", max_batch=16, dtype="float32")
    local._load()

    async def timed(executor, batch) -> tuple[int, float]:
        try:
            return await spogw_side(executor, batch, args.max_tokens)
        finally:
            await executor.aclose()

    asyncio.run(raw_side(engine.url, executor_chats(4, 50), 4, 8))  # warm-up, untimed
    names = list(totals)
    for round_ in range(args.rounds):
        # the three sides in a rotating order; raw and spogw swap their halves of the requests every round
        for k in range(len(names)):
            side = names[(k + round_) % len(names)]
            if side == "raw engine":
                run = raw_side(engine.url, halves[round_ % 2], args.concurrency, args.max_tokens)
            elif side == "spogw":
                run = timed(make_executor(options, Path(tempfile.mkdtemp()), engine), halves[(round_ + 1) % 2])
            else:
                batch = local_chats[round_ * args.local_requests:(round_ + 1) * args.local_requests]
                run = timed(local, batch)
            tokens, seconds = asyncio.run(run)
            totals[side][0] += tokens
            totals[side][1] += seconds
            print(f"  executor round {round_ + 1}, {side:13s}: {tokens:6d} tokens in {seconds:6.1f} s = "
                  f"{tokens / seconds:6.1f} tok/s", flush=True)
    return {side: t / s for side, (t, s) in totals.items()}


def generator_part(engine, args) -> dict[str, float]:
    from spogw.benchmarks import load_benchmark
    from spogw.generation import TransformersGenerator, make_generator
    from spogw.models import load_tokenizer
    from spogw.sampling import workflow_messages

    tok = load_tokenizer("embedded")
    records = load_benchmark("humaneval", "train", limit=max(2, args.queries))
    sides = {"engine, segments": make_generator("embedded", backend="engine", engine=engine),
             "engine, one regex": make_generator("embedded", backend="engine", engine=engine),
             "transformers (today)": TransformersGenerator("embedded", batch_size=args.m, dtype="float32")}
    sides["engine, one regex"].guided = "regex"
    for name in args.skip_sides:
        sides.pop(name, None)
    totals = {name: [0, 0.0] for name in sides}
    kwargs = dict(n=args.m, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, guide="code")
    for gen in sides.values():  # untimed warm-up: model load, token tables, grammar compilation
        gen.generate([workflow_messages(records[0], args.prompt_file)], **{**kwargs, "n": 2})
    half = max(1, args.queries // 2)
    halves = [records[:half], records[half:2 * half]]
    names = list(sides)
    # every side samples both halves; the order rotates so that no side always runs first or gets the same queries
    schedule = [(names[(k + r) % len(names)], (k + r) % 2) for r in range(2) for k in range(len(names))]
    for round_, (name, h) in enumerate(schedule):
        prompts = [workflow_messages(r, args.prompt_file) for r in halves[h]]
        start = time.perf_counter()
        out = sides[name].generate(prompts, seed=round_, **kwargs)
        seconds = time.perf_counter() - start
        tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for group in out for t in group)
        totals[name][0] += tokens
        totals[name][1] += seconds
        print(f"  generator {name:22s}: {len(prompts)} queries x m={args.m}, {tokens:6d} tokens in {seconds:6.1f} s = "
              f"{tokens / seconds:6.1f} tok/s", flush=True)
    return {name: t / s for name, (t, s) in totals.items()}


def bf16_bound(batch: int = 64) -> tuple[float, float]:
    """(GFLOP/s of bf16 matmuls at ``batch`` rows of SmolLM2-135M's shapes, tokens/s bound at 2 x params a token)."""
    import torch

    from spogw.models import load_causal_lm

    model = load_causal_lm("embedded", dtype="bfloat16")
    params = sum(p.numel() for p in model.parameters())
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
    mats = [torch.randn(a, b, dtype=torch.bfloat16) for a, b in shapes]
    x = {a: torch.randn(batch, a, dtype=torch.bfloat16) for a, _ in shapes}
    flops = sum(2 * batch * a * b for a, b in shapes)
    for _ in range(3):
        for (a, _), w in zip(shapes, mats, strict=True):
            x[a] @ w
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        for (a, _), w in zip(shapes, mats, strict=True):
            x[a] @ w
    gflops = flops * reps / (time.perf_counter() - start) / 1e9
    return gflops, gflops * 1e9 / (2 * params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=96, help="executor requests per side and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--local-requests", type=int, default=16, help="local executor requests per round")
    parser.add_argument("--queries", type=int, default=8, help="generator queries per side (two rounds of half)")
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=448)
    parser.add_argument("--prompt-file", default=str(REPO / "configs" / "prompts" / "quickstart_generator.txt"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["executor", "generator", "bound"])
    parser.add_argument("--skip-sides", nargs="*", default=[], help="generator sides to leave out")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from spogw.engine import EngineOptions, open_engine

    print("load average before:", os.getloadavg())
    results: dict[str, dict[str, float]] = {}
    with open_engine(EngineOptions(dtype=args.dtype), "embedded", Path(tempfile.mkdtemp(prefix="spogw-bench-"))) as eng:
        if eng.ready() is None:
            sys.exit(f"the engine could not start: {eng.reason}")
        print(f"engine up in {eng.startup_s} s ({args.dtype}); log {eng.log_path}")
        if "executor" not in args.skip:
            results["executor"] = executor_part(eng, args)
        if "generator" not in args.skip:
            results["generator"] = generator_part(eng, args)
    bound = None if "bound" in args.skip else bf16_bound()
    print("load average after:", os.getloadavg())
    print(f"\nSmolLM2-135M-Instruct, engine dtype {args.dtype}, 2-core share of this machine:")
    if "executor" in results:
        r = results["executor"]
        print(f"  executor completion tok/s at c={args.concurrency}: raw engine {r['raw engine']:.1f}, spogw "
              f"{r['spogw']:.1f}, today's local {r['local (today)']:.1f}")
        print(f"    spogw / raw engine = {r['spogw'] / r['raw engine']:.2f} (goal >= {GOALS['spogw / raw']}); "
              f"spogw / local = {r['spogw'] / r['local (today)']:.1f}x (goal >= {GOALS['spogw / local']}x)")
    if "generator" in results:
        g = results["generator"]
        today = g.get("transformers (today)")
        for name, rate in g.items():
            versus = f", {rate / today:.1f}x today's" if today and name != "transformers (today)" else ""
            print(f"  generator guided tok/s, {name}: {rate:.1f}{versus}; {rate / 83:.1f}x the issue's 83 (goal >= 4x)")
    if bound is not None:
        print(f"  bf16 compute bound: {bound[0]:.0f} GFLOP/s at batch 64 -> {bound[1]:.0f} tokens/s decode bound")


if __name__ == "__main__":
    main()
