"""Entry functions that tests/test_sandbox.py runs in sandboxed children via run_entry (file path entries)."""

from __future__ import annotations

import asyncio
import os
import sys


def echo(payload, rpc):
    """Blocking call; returns what the parent answered."""
    return {"got": rpc.call({"op": "echo", "x": payload["x"]}), "uid": os.getuid()}


async def concurrent(payload, rpc):
    """Several acalls in flight at once: the parent's handler sleeps, so they only finish fast if multiplexed."""
    replies = await asyncio.gather(*(rpc.acall({"op": "slow", "i": i}) for i in range(payload["n"])))
    return [r["i"] for r in replies]


def handler_error(payload, rpc):
    try:
        rpc.call({"op": "fail"})
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None}


def die_mid_request(payload, rpc):
    """Sends a request, then dies before the reply can arrive."""
    rpc._send({"op": "slow", "i": 0}, lambda msg: None)
    os._exit(7)


def never_returns(payload, rpc):
    import time

    while True:
        time.sleep(1)


def garbage(payload, rpc):
    """Garbage on stdout is harmless; garbage on the rpc pipe breaks the protocol."""
    print("not json \x00\x01" * 100)
    sys.stdout.flush()
    os.write(5, b"\xff\xff\xff\xffgarbage")
    import time

    time.sleep(5)
    return "unreachable"


def flood(payload, rpc):
    """Fire requests without waiting for replies."""
    for i in range(payload["n"]):
        rpc._send({"op": "echo", "x": i}, lambda msg: None)
    import time

    time.sleep(5)
    return "flooded"


def not_json(payload, rpc):
    return {1, 2, 3}


def exits(payload, rpc):
    sys.exit(payload.get("code", 0))


def slow_calls(payload, rpc):
    """Blocking calls the parent takes its time to answer; the child itself does almost nothing."""
    return [rpc.call({"op": "sleep", "s": payload["s"]})["s"] for _ in range(payload["n"])]


def calls_then_spins(payload, rpc):
    """Slow calls, then a loop of its own that never ends: its own time must still run out."""
    for _ in range(payload["n"]):
        rpc.call({"op": "sleep", "s": payload["s"]})
    import time

    while True:
        time.sleep(0.05)
