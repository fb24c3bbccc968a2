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
