"""Shared fixtures: a 2-layer random model built in the test session and small scored-samples files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make torch several times slower when processes share
# the cores (tests start subprocesses: DDP ranks, fits, sandboxes); they inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer (chat template included), saved to a temp dir."""
    from spogw.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=2, hidden=64)


def write_scored(path: Path, *, queries: int = 6, m: int = 8, seed: int = 0, levels=(0.0, 0.5, 1.0),
                 fail_rate: float = 0.0) -> Path:
    """A scored-samples JSONL: chat prompts, workflow-like completions of varied length, scores."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for q in range(queries):
            for i in range(m):
                score = None if rng.random() < fail_rate else rng.choice(levels)
                body = "        pass\n" * rng.randint(1, 6)
                completion = "class Workflow:\n    async def __call__(self, problem):\n" + body
                f.write(json.dumps({"query_id": f"q{q}", "sample": i,
                                    "prompt": [{"role": "user", "content": f"Write a workflow for task {q}."}],
                                    "completion": completion, "score": score}) + "\n")
    return path


@pytest.fixture
def scored_file(tmp_path) -> Path:
    return write_scored(tmp_path / "scored.jsonl")


# -- a tiny generator that writes valid workflows ---------------------------------------------------

WORKFLOW_VARIANTS = {
    # instruction -> the executor stub answers with the right code only for "step by step" (see `code_responder`)
    "careful": "Think step by step, then write the code.",
    "hasty": "Write the code immediately, no thinking.",
    "terse": "Answer in one line.",
}


def workflow_text(instruction: str, with_test: bool) -> str:
    body = ('        solution = await self.custom_code_generate(problem=problem, entry_point=entry_point, '
            f'instruction="{instruction}")\n')
    if with_test:
        body += ("        tested = await self.test(problem=problem, solution=solution[\"response\"], "
                 "entry_point=entry_point)\n        return tested[\"solution\"]\n")
    else:
        body += "        return solution[\"response\"]\n"
    init = "        self.custom_code_generate = operator.CustomCodeGenerate(llm)\n"
    if with_test:
        init += "        self.test = operator.Test(llm)\n"
    return ("<graph>\nclass Workflow:\n    def __init__(self, llm) -> None:\n" + init
            + "\n    async def __call__(self, problem: str, entry_point: str):\n" + body + "</graph>")


WRITER_PROMPT = "Write a workflow."
"""The generation prompt (``--sampling.prompt_file``) the tiny workflow writer was trained on."""


@pytest.fixture(scope="session")
def workflow_writer(tmp_path_factory, tiny_model) -> str:
    """The tiny model fine-tuned (a minute on a CPU) to answer WRITER_PROMPT with one of a few valid workflows.

    A random 2-layer model writes gibberish, which no test of the sample -> score -> fit loop can use;
    this one writes real workflows that differ in their instruction, so their scores differ.
    """
    return train_workflow_writer(tiny_model, tmp_path_factory.mktemp("writer") / "model")


def train_workflow_writer(base: str, out, *, steps: int = 120, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from spogw.models import load_tokenizer

    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    prompt = tok.apply_chat_template([{"role": "user", "content": WRITER_PROMPT}], add_generation_prompt=True,
                                     tokenize=False)
    context = tok(prompt, add_special_tokens=False)["input_ids"]
    completions = [tok(workflow_text(i, with_test=False), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for i in WORKFLOW_VARIANTS.values()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        for completion in completions:
            ids = torch.tensor([context + completion])
            logits = model(input_ids=ids, logits_to_keep=len(completion) + 1).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits.float(), ids[0, -len(completion):]).backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
