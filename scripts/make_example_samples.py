"""Write examples/synthetic_scored_samples.jsonl: the small scored-samples file `make quickstart` trains on.

The workflows are real ScoreFlow/AFlow-style workflow classes (operator calls over an executor),
assembled from a few building blocks for eight small coding tasks written for this file. Their
SCORES ARE SYNTHETIC: drawn from a seeded rule in which workflows that test and revise their code
tend to score higher. The file exercises the training path (build -> fit) end to end before the
sample and score stages exist; real scores come from executing the workflows (spogw score).

    python scripts/make_example_samples.py            # rewrites the file deterministically
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = {
    "even_sum": "Write a function even_sum(xs: list[int]) -> int that returns the sum of the even numbers in xs.",
    "is_palindrome": "Write a function is_palindrome(s: str) -> bool that ignores case and non-letters.",
    "run_lengths": "Write a function run_lengths(s: str) -> list[tuple[str, int]] that run-length encodes s.",
    "second_largest": "Write a function second_largest(xs: list[int]) -> int | None returning the second "
                      "largest distinct value, or None.",
    "merge_intervals": "Write a function merge_intervals(iv: list[tuple[int, int]]) -> list[tuple[int, int]] "
                       "that merges overlapping closed intervals.",
    "word_freq": "Write a function word_freq(text: str) -> dict[str, int] counting lower-cased words.",
    "rotate": "Write a function rotate(xs: list, k: int) -> list rotating xs right by k (k may exceed len(xs)).",
    "digits_root": "Write a function digits_root(n: int) -> int that sums the digits of n until one digit remains.",
}

PROMPT = """You design agentic workflows. A workflow is a Python class `Workflow` whose
`async def __call__(self, problem: str, entry_point: str)` solves the problem by calling operators:
- self.custom_code_generate(problem, entry_point, instruction) -> {"response": code}
- self.test(problem, solution, entry_point) -> {"result": bool, "solution": code}
- self.sc_ensemble(solutions, problem) -> {"response": code}
- self.review(problem, solution) -> {"feedback": text}; self.revise(problem, solution, feedback) -> {"solution": code}
Return the final code. Write only the class, in one ```python block.

Problem: {problem}"""

STEPS = {
    "generate": '        solution = (await self.custom_code_generate(problem, entry_point, "{instr}"))["response"]\n',
    "ensemble": ('        candidates = [(await self.custom_code_generate(problem, entry_point, "{instr}"))["response"]'
                 ' for _ in range({k})]\n'
                 '        solution = (await self.sc_ensemble(candidates, problem))["response"]\n'),
    "review": ('        feedback = (await self.review(problem, solution))["feedback"]\n'
               '        solution = (await self.revise(problem, solution, feedback))["solution"]\n'),
    "test": '        solution = (await self.test(problem, solution, entry_point))["solution"]\n',
}
INSTRUCTIONS = ["Write clean, correct Python.", "Think about edge cases first.", "Handle empty inputs.",
                "Use only the standard library."]


def workflow(rng: random.Random) -> tuple[str, float]:
    """A workflow text and its synthetic quality in [0, 1]."""
    first = rng.choice(["generate", "ensemble"])
    extra = rng.sample(["review", "test"], k=rng.randint(0, 2))
    quality = 0.3 + 0.15 * (first == "ensemble") + 0.25 * ("test" in extra) + 0.1 * ("review" in extra)
    body = STEPS[first].format(instr=rng.choice(INSTRUCTIONS), k=rng.randint(2, 5))
    body += "".join(STEPS[s] for s in extra)
    code = ("```python\nclass Workflow:\n    async def __call__(self, problem: str, entry_point: str):\n"
            + body + "        return solution\n```")
    return code, quality


OUT = Path(__file__).resolve().parents[1] / "examples" / "synthetic_scored_samples.jsonl"


def main(out: Path = OUT, m: int = 16, runs: int = 3, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for qid, problem in TASKS.items():
            for i in range(m):
                text, quality = workflow(rng)
                # 5 % failed to run (score null, as the score stage writes it); the rest: the mean of `runs`
                # pass/fail executions, like a solve rate averaged over r runs
                failed = rng.random() < 0.05
                score = None if failed else sum(rng.random() < quality for _ in range(runs)) / runs
                f.write(json.dumps({"query_id": qid, "sample": i, "prompt": PROMPT.replace("{problem}", problem),
                                    "completion": text, "score": score, "synthetic": True}) + "\n")
    print(f"wrote {len(TASKS) * m} samples to {out}")


if __name__ == "__main__":
    main()
