"""A stand-in for vLLM's OpenAI server: a real program on loopback speaking the few endpoints spogw uses.

The engine tests point ``--engine.command`` at it (``[python, tests/engine_standin.py]``); it takes the vLLM
flags spogw passes (``--port``, ``--served-model-name``, ...), ignores the rest, and like vLLM it runs a child
process (its "engine core") in its own process group, so stopping has a tree to stop.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (token-id prompts, ``n``, ``seed``;
with ``structured_outputs.regex`` it answers a workflow of the requested family's grammar, a different path
per choice), ``POST /v1/chat/completions``, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Behaviour from the environment (to stage the failures spogw must survive):

* ``STANDIN_STARTUP_S`` — seconds of "loading" before it listens (log lines meanwhile);
* ``STANDIN_NEVER_READY=1`` — never listens;
* ``STANDIN_FAIL=memory`` — exits at start with vLLM's out-of-memory message;
* ``STANDIN_BIND_PORT=P`` — binds port P instead of ``--port`` (a test holds P: the real "address in use");
* ``STANDIN_DIE_AFTER=N`` — the whole group dies (SIGKILL) on the N-th completion request;
* ``STANDIN_GARBAGE=1`` — completion requests get a 200 whose body is not a completion;
* ``STANDIN_RECORD=path`` — every request (path and JSON body) appended to ``path`` as a JSON line;
* ``STANDIN_SOLUTIONS=dir`` — chat replies to a code request are the HumanEval (AFlow files in ``dir``) solution
  of the function asked for when the prompt carries a plan ("Plan:"), a wrong function otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(message: str) -> None:
    print(f"standin: {message}", flush=True)


class StandIn:
    def __init__(self, served: str):
        self.served, self.adapters = served, {}
        self.completions = 0
        self.die_after = int(os.environ.get("STANDIN_DIE_AFTER", "0"))
        self.garbage = os.environ.get("STANDIN_GARBAGE") == "1"
        self.record = os.environ.get("STANDIN_RECORD")

    def note(self, path: str, body) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps({"path": path, "body": body}) + "\n")

    def respond(self, method: str, path: str, body: bytes) -> tuple[int, dict | bytes]:
        data = json.loads(body) if body else None
        self.note(path, data)
        if method == "GET" and path == "/health":
            return 200, {}
        if method == "GET" and path == "/v1/models":
            return 200, {"data": [{"id": self.served}] + [{"id": name} for name in self.adapters]}
        if path == "/v1/load_lora_adapter":
            if not Path(data["lora_path"], "adapter_config.json").is_file():
                return 404, {"error": {"message": f"no adapter at {data['lora_path']}"}}
            if data["lora_name"] in self.adapters:  # vLLM 0.32's answer to a name it holds
                return 400, {"error": {"message": f"The lora adapter '{data['lora_name']}' has already been loaded. "
                                                  "If you want to load the adapter in place, set 'load_inplace' to "
                                                  "True."}}
            self.adapters[data["lora_name"]] = data["lora_path"]
            return 200, b"Success"
        if path == "/v1/unload_lora_adapter":
            self.adapters.pop(data["lora_name"], None)
            return 200, b"Success"
        if path in ("/v1/completions", "/v1/chat/completions"):
            if data.get("model") not in {self.served, *self.adapters}:
                return 404, {"error": {"message": f"The model `{data.get('model')}` does not exist."}}
            self.completions += 1
            if self.die_after and self.completions >= self.die_after:
                log("fatal: EngineCore died (staged)")
                os.killpg(os.getpgrp(), signal.SIGKILL)
            if self.garbage:
                return 200, {"id": "cmpl-garbage", "object": "nonsense"}
            return 200, self.completion(data) if path == "/v1/completions" else self.chat(data)
        return 404, {"error": {"message": "not found"}}

    def completion(self, data: dict) -> dict:
        n, seed = int(data.get("n", 1)), int(data.get("seed") or 0)
        regex = (data.get("structured_outputs") or {}).get("regex")
        texts = [self.text(regex, seed + i, data) for i in range(n)]
        choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
        if data.get("return_token_ids"):  # as vLLM: the sampled ids (here: the text's, in SmolLM2's vocabulary)
            for c in choices:
                c["token_ids"] = self.tokenizer()(c["text"], add_special_tokens=False)["input_ids"]
        return {"id": "cmpl-standin", "object": "text_completion", "model": data["model"],
                "choices": choices[::-1],
                "usage": {"prompt_tokens": len(data["prompt"]),
                          "completion_tokens": sum(len(t.split()) for t in texts)}}

    def tokenizer(self):
        if not hasattr(self, "_tokenizer"):
            from spogw.models import load_tokenizer

            self._tokenizer = load_tokenizer("embedded")
        return self._tokenizer

    def text(self, regex: str | None, seed: int, data: dict) -> str:
        if regex is None:
            return f"sample {seed} from {data['model']}"
        from spogw.workflows.guide import load_guide

        for family in ("code", "math", "qa"):
            guide = load_guide(family)
            if guide.regex() == regex:
                paths = guide.paths()
                return guide.render(paths[seed % len(paths)], [f"Step {seed} with care."] * 8)
        if regex.startswith("(?:"):  # one step's choice: an alternation of escaped option heads
            options = split_alternation(regex[3:-1])
            return options[seed % len(options)][:4 * int(data.get("max_tokens", 4))]
        return f"Step {seed} with care.\""  # an instruction and its closing quote

    def chat(self, data: dict) -> dict:
        last = data["messages"][-1]["content"]
        text = self.solve(last) or f"echo from {data['model']}: {last[:60]}"
        return {"id": "chatcmpl-standin", "object": "chat.completion", "model": data["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(last.split()), "completion_tokens": len(text.split())}}


    _solutions: dict | None = None

    def solve(self, prompt: str) -> str | None:
        folder = os.environ.get("STANDIN_SOLUTIONS")
        if not folder:
            return None
        if self._solutions is None:
            from spogw.benchmarks import load_benchmark

            self._solutions = {r.entry_point: r.answer for r in load_benchmark("humaneval", "train", data_dir=folder)}
        entry = next((ep for ep in self._solutions if f"def {ep}(" in prompt or f"`{ep}`" in prompt), None)
        if entry is None:
            return None
        if "Plan:" in prompt:
            return f"```python\n{self._solutions[entry]}\n```"
        return f"```python\ndef {entry}(*args, **kwargs):\n    return None\n```"


def split_alternation(body: str) -> list[str]:
    """The alternatives of ``a|b|c`` escaped as spogw.workflows.guide._escape does, unescaped."""
    options, current, i = [], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            current.append("\n" if body[i + 1] == "n" else body[i + 1])
            i += 2
            continue
        if c == "|":
            options.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    return options + ["".join(current)]


async def serve(standin: StandIn, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = standin.respond(method, path, body)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                writer.write((f"HTTP/1.1 {status} X\r\nContent-Length: {len(raw)}\r\nContent-Type: application/json"
                              "\r\nConnection: keep-alive\r\n\r\n").encode() + raw)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    log(f"listening on 127.0.0.1:{port}")
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="base")
    args, rest = parser.parse_known_args()
    log(f"args: {' '.join(sys.argv[1:])}")
    if os.environ.get("STANDIN_FAIL") == "memory":
        log("loading weights")
        print("ValueError: Available memory on node 0 (1.20/21.21 GiB) on startup is less than desired CPU memory "
              "utilization (0.92, 19.51 GiB).", flush=True)
        sys.exit(1)
    # the "engine core": a child in the same process group, as vLLM's EngineCore and Worker
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    log(f"engine core pid {child.pid}")
    for i in range(int(float(os.environ.get("STANDIN_STARTUP_S", "0")) * 10)):
        if i % 5 == 0:
            log(f"loading weights ({i // 10} s)")
        time.sleep(0.1)
    if os.environ.get("STANDIN_NEVER_READY") == "1":
        while True:
            log("still compiling")
            time.sleep(0.5)
    port = int(os.environ.get("STANDIN_BIND_PORT", args.port))
    try:
        asyncio.run(serve(StandIn(args.served_model_name), port))
    except OSError as exc:
        print(f"OSError: [Errno {exc.errno}] error while attempting to bind on address ('127.0.0.1', {port}): "
              f"{exc.strerror.lower()}", flush=True)
        child.kill()
        sys.exit(1)


if __name__ == "__main__":
    main()
