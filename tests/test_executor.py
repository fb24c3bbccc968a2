"""Executor backends and the response cache, against a real loopback OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubConfig

from spogw.runtime.cache import CachedExecutor, ResponseCache, cache_key
from spogw.runtime.executor import ChatResult, Executor, LocalExecutor, OpenAIExecutor, Usage

pytest.importorskip("openai")


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


@pytest.fixture(params=["openai", "lean"])
def transport(request) -> str:
    """Both transports must behave the same under every fault."""
    return request.param


def make(stub: OpenAIStub, **kw) -> OpenAIExecutor:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("max_retries", 3)
    return OpenAIExecutor(stub.base_url, "stub-model", api_key_env="SPOGW_TEST_NO_KEY", **kw)


async def gather_chats(executor: Executor, texts: list[str], **kw) -> list[ChatResult]:
    try:
        return await asyncio.gather(*(executor.chat(user(t), **kw) for t in texts))
    finally:
        await executor.aclose()  # clients belong to this event loop


def test_replies_tokens_and_cost_are_accounted(transport):
    with OpenAIStub() as stub:
        ex = make(stub, price_in_per_m=1_000_000.0, price_out_per_m=2_000_000.0, transport=transport)
        results = asyncio.run(gather_chats(ex, [f"question {i}" for i in range(50)]))
    assert [r.text for r in results] == [f"echo: question {i}" for i in range(50)]
    # the stub counts words: prompt "be brief" + "question i" = 4, reply "echo: question i" = 3
    assert all((r.prompt_tokens, r.completion_tokens) == (4, 3) for r in results)
    assert results[0].cost_usd == pytest.approx(4 * 1.0 + 3 * 2.0)
    usage = Usage()
    for r in results:
        usage.add(r)
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (50, 200, 150)
    assert usage.cost_usd == pytest.approx(50 * 10.0)
    assert stub.requests == 50


def test_429_and_500_are_retried_until_they_succeed(transport):
    with OpenAIStub() as stub:
        ex = make(stub, max_retries=3, transport=transport)
        r429, r500 = asyncio.run(gather_chats(ex, ["a #fail:429*2", "b #fail:500*3"]))
    assert r429.ok and r429.text == "echo: a #fail:429*2"
    assert r500.ok and r500.text == "echo: b #fail:500*3"
    assert stub.requests == 3 + 4
    assert stub.stats.by_outcome["429"] == 2 and stub.stats.by_outcome["500"] == 3


def test_hard_failures_are_recorded_with_their_cause(transport):
    with OpenAIStub() as stub:
        ex = make(stub, max_retries=1, timeout_s=0.5, transport=transport)
        texts = ["x #fail:500*9", "y #fail:429*9", "z #hang*9", "w #malformed*1", "fine"]
        results = dict(zip(texts, asyncio.run(gather_chats(ex, texts)), strict=True))
    assert "HTTP 500" in results["x #fail:500*9"].error and "after 1 retries" in results["x #fail:500*9"].error
    assert "HTTP 429" in results["y #fail:429*9"].error
    assert "Timeout" in results["z #hang*9"].error and "after 1 retries" in results["z #hang*9"].error
    assert "malformed reply body" in results["w #malformed*1"].error  # a failure with a cause, not a crash
    assert results["fine"].ok and results["fine"].text == "echo: fine"
    assert all(r.text == "" for t, r in results.items() if t != "fine")
    usage = Usage()
    for r in results.values():
        usage.add(r)
    assert usage.failed_calls == 4 and len(usage.errors) == 4


def test_connection_refused_is_recorded(transport):
    with OpenAIStub() as stub:
        url = stub.base_url
    ex = OpenAIExecutor(url, "m", api_key_env="SPOGW_TEST_NO_KEY", max_retries=1, timeout_s=2, transport=transport)
    (result,) = asyncio.run(gather_chats(ex, ["anyone there?"]))
    assert not result.ok and "Connect" in result.error and "after 1 retries" in result.error


def test_nothing_is_lost_across_hundreds_of_concurrent_calls_with_faults(transport):
    cfg = StubConfig(latency=0.01, fail_rate=0.15, fail_kinds=("429", "500", "malformed"), seed=3)
    with OpenAIStub(cfg) as stub:
        ex = make(stub, concurrency=32, max_retries=4, transport=transport)
        texts = [f"job {i}" for i in range(400)]
        results = asyncio.run(gather_chats(ex, texts))
        assert stub.stats.max_in_flight <= 32
    assert len(results) == 400
    for text, r in zip(texts, results, strict=True):
        assert (r.ok and r.text == f"echo: {text}") or (not r.ok and r.error), (text, r)
    # only malformed bodies are not retried; 429/500 always recover within 4 retries at 15 %
    failed = [r for r in results if not r.ok]
    assert all("HTTP" not in r.error for r in failed)
    assert stub.stats.by_outcome["429"] + stub.stats.by_outcome["500"] > 0


def test_concurrency_bound_is_respected(transport):
    with OpenAIStub(StubConfig(latency=0.1)) as stub:
        ex = make(stub, concurrency=4, transport=transport)
        start = time.perf_counter()
        asyncio.run(gather_chats(ex, [f"q{i}" for i in range(16)]))
        elapsed = time.perf_counter() - start
        assert stub.stats.max_in_flight == 4
    assert elapsed >= 0.4


def test_missing_key_for_openai_itself_names_the_flag(monkeypatch):
    monkeypatch.delenv("SPOGW_TEST_NO_KEY", raising=False)
    ex = OpenAIExecutor(None, "gpt-4o-mini", api_key_env="SPOGW_TEST_NO_KEY")
    with pytest.raises(RuntimeError, match="SPOGW_TEST_NO_KEY"):
        asyncio.run(gather_chats(ex, ["hi"]))


# -- response cache ----------------------------------------------------------------------------


def test_cache_key_covers_everything_that_changes_a_reply():
    base = dict(temperature=0.0, max_tokens=64, run_index=0)
    k = cache_key("m", user("a"), **base)
    assert k == cache_key("m", user("a"), **base)
    assert k != cache_key("m2", user("a"), **base)
    assert k != cache_key("m", user("b"), **base)
    assert k != cache_key("m", user("a"), **{**base, "temperature": 0.5})
    assert k != cache_key("m", user("a"), **{**base, "max_tokens": 65})
    assert k != cache_key("m", user("a"), **{**base, "run_index": 1})
    assert k != cache_key("m", user("a"), **base, repeat=1)


def test_warm_cache_rerun_makes_zero_requests_and_failures_are_retried(tmp_path):
    texts = [f"item {i}" for i in range(30)] + ["bad #fail:500*2"]
    with OpenAIStub() as stub:
        first = CachedExecutor(make(stub, max_retries=0), tmp_path / "cache.sqlite")
        cold = asyncio.run(gather_chats(first, texts))
        assert stub.requests == 31 and not cold[-1].ok
        stub.reset_counts()
        # a second process-like instance on the same file: the 30 answers are free, the failure is retried
        second = CachedExecutor(make(stub, max_retries=2), tmp_path / "cache.sqlite")
        warm = asyncio.run(gather_chats(second, texts))
        assert stub.requests == 2  # one 500 left on that body, then success; nothing else asked
        assert [r.text for r in warm[:30]] == [r.text for r in cold[:30]]
        assert all(r.cached for r in warm[:30]) and warm[-1].ok and not warm[-1].cached
        stub.reset_counts()
        third = CachedExecutor(make(stub), tmp_path / "cache.sqlite")
        asyncio.run(gather_chats(third, texts))
        assert stub.requests == 0 and third.misses == 0 and third.hits == 31
        # a different run index is a different sample: it is asked
        asyncio.run(gather_chats(third, ["item 0"], run_index=1))
        assert stub.requests == 1


def test_identical_requests_in_flight_are_sent_once(tmp_path):
    with OpenAIStub(StubConfig(latency=0.2)) as stub:
        cached = CachedExecutor(make(stub), tmp_path / "c.sqlite")
        results = asyncio.run(gather_chats(cached, ["same"] * 5 + ["other"]))
        assert stub.requests == 2 and cached.misses == 2 and cached.hits == 4
    assert len({r.text for r in results[:5]}) == 1 and sum(r.cached for r in results[:5]) == 4
    usage = Usage()
    for r in results:
        usage.add(r)
    assert usage.calls == 6 and usage.cached_calls == 4


def test_a_cancelled_caller_does_not_fail_the_identical_requests_that_joined_it(tmp_path):
    """A workflow that times out cancels its executor call; the other workflows waiting on the same request must
    get a real reply (they ask again), not a recorded failure that would make them infrastructure errors."""
    with OpenAIStub(StubConfig(latency=0.3)) as stub:
        cached = CachedExecutor(make(stub), tmp_path / "c.sqlite")

        async def main():
            first = asyncio.create_task(cached.chat([{"role": "user", "content": "same"}]))
            await asyncio.sleep(0.05)
            joiners = [asyncio.create_task(cached.chat([{"role": "user", "content": "same"}])) for _ in range(3)]
            await asyncio.sleep(0.05)
            first.cancel()
            return await asyncio.gather(*joiners)

        results = asyncio.run(main())
    assert all(r.ok and r.text for r in results), [r.error for r in results]
    assert cached.misses == 2  # the cancelled request, then one more for the three that waited


def test_cached_usage_is_counted_apart():
    usage = Usage()
    usage.add(ChatResult("a", 10, 5, 0.5))
    usage.add(ChatResult("a", 10, 5, 0.5, cached=True))
    assert usage.cost_usd == 0.5 and usage.cached_cost_usd == 0.5 and usage.cached_calls == 1


WRITER = textwrap.dedent("""
    import sys
    from spogw.runtime.cache import ResponseCache
    from spogw.runtime.executor import ChatResult
    cache = ResponseCache(sys.argv[1])
    who = sys.argv[2]
    for i in range(300):
        cache.put(f"shared-{i}", "m", ChatResult(f"shared {i}", 1, 1, 0.0))
        cache.put(f"{who}-{i}", "m", ChatResult(f"{who} {i}", 1, 1, 0.0))
""")


def test_two_processes_write_the_cache_concurrently(tmp_path):
    path = tmp_path / "shared.sqlite"
    ResponseCache(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who], stderr=subprocess.PIPE)
             for who in ("p1", "p2")]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    cache = ResponseCache(path)
    assert len(cache) == 900
    assert cache.get("p1-299").text == "p1 299" and cache.get("p2-0").text == "p2 0"
    assert cache.get("shared-7").text == "shared 7"


# -- local transformers executor ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from spogw.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_local_executor_batches_concurrent_requests_and_matches_unbatched_greedy(tiny_model, tmp_path):
    prompts = [f"Say something about the number {i}." + " really" * i for i in range(6)]
    batched = LocalExecutor(tiny_model, max_batch=8, gather_ms=50)
    together = asyncio.run(gather_chats(batched, prompts, max_tokens=12))
    assert batched.generate_calls == 1 and batched.batch_sizes == [6]

    alone = LocalExecutor(tiny_model, max_batch=1)

    async def one_by_one():
        out = [await alone.chat(user(p), max_tokens=12) for p in prompts]
        await alone.aclose()
        return out

    single = asyncio.run(one_by_one())
    assert alone.generate_calls == 6
    assert [r.text for r in together] == [r.text for r in single]
    assert all(r.ok and r.completion_tokens > 0 and r.prompt_tokens > 0 for r in together)
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in single]

    # the cache works the same in front of the local backend
    cached = CachedExecutor(LocalExecutor(tiny_model), tmp_path / "local.sqlite")
    asyncio.run(gather_chats(cached, prompts[:2], max_tokens=12))
    asyncio.run(gather_chats(cached, prompts[:2], max_tokens=12))
    assert cached.executor.generate_calls == 1 and cached.hits == 2


def test_local_executor_splits_batches_by_sampling_parameters(tiny_model):
    ex = LocalExecutor(tiny_model, max_batch=4, gather_ms=50)

    async def mixed():
        out = await asyncio.gather(*(ex.chat(user(f"p{i}"), max_tokens=4 + (i % 2)) for i in range(10)))
        await ex.aclose()
        return out

    results = asyncio.run(mixed())
    assert len(results) == 10 and all(r.ok for r in results)
    assert sum(ex.batch_sizes) == 10 and max(ex.batch_sizes) <= 4 and ex.generate_calls >= 4


def test_protocol_is_satisfied():
    assert isinstance(OpenAIExecutor("http://x/v1", "m"), Executor)
    assert isinstance(LocalExecutor("embedded"), Executor)
    assert Path(__file__).name == "test_executor.py"
