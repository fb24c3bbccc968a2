"""The paper's six static baselines (Table 1), as ordinary workflow texts.

Each baseline is a ``Workflow`` class in exactly the convention the generator writes (see
``spogw/workflows/parsing.py``), built from the same operators, so it runs through the same
validation, sandbox, executor, cache and scoring path as a generated workflow: a difference in the
table is a difference in the workflow, not in the plumbing. One text per (method, family); the
families differ in how an answer is produced (``CustomCodeGenerate`` for code, ``Custom`` with a
``\\boxed{}`` instruction for math, a short answer for QA, whose F1 punishes long outputs).

Readings of the methods (the paper names them without detail):

* **IO** — one direct call, no reasoning asked for.
* **CoT** (Wei et al.) — one call that reasons step by step, then answers (QA: ``AnswerGenerate``,
  which is exactly a thought followed by a concise answer).
* **CoT-SC** (Wang et al.) — 5 CoT samples, then ``ScEnsemble`` picks the most consistent. The paper's
  executor runs at temperature 0, where five identical prompts give five identical samples; the five
  samples therefore use five differently worded CoT instructions (the diversity the generator prompt
  also asks for). At a temperature above 0 they are sampled as well.
* **MedPrompt** (Nori et al.), "3 responses, 5 votes" — 3 CoT responses, then 5 ensemble votes, each
  with the candidates in a different shuffled order (choice shuffling, which cancels the judge's
  position bias; MetaGPT's ``MdEnsemble`` reads it the same way); the most-voted candidate wins, ties
  to the earlier one. The shuffles are seeded, so a run is reproducible and cacheable. When all 3
  responses are identical the vote cannot change the answer and is skipped.
* **MultiPersona** (debate) — two personas answer independently, then each sees both answers and
  gives its final one (one debate round), then a judge (``ScEnsemble``) picks between the two final
  answers. The judge picks rather than rewrites, so code stays runnable code.
* **Self-Refine** (Madaan et al.) — a CoT answer, then up to 2 rounds of ``Review`` (feedback) →
  ``Revise`` (refinement), stopping early when the review finds no error.

For QA, every method whose answer is a reasoning text ends with ``Format`` (the short answer F1 is
computed on). Independent calls are awaited together with ``asyncio.gather``, so a batching executor
(``LocalExecutor``) serves them in one batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

BASELINES: tuple[str, ...] = ("io", "cot", "cot_sc", "medprompt", "multipersona", "self_refine")
"""Method keys in the paper's Table 1 order."""
DISPLAY_NAMES: dict[str, str] = {"io": "IO", "cot": "CoT", "cot_sc": "CoT SC", "medprompt": "MedPrompt",
                                 "multipersona": "MultiPersona", "self_refine": "Self Refine"}
SC_SAMPLES = 5
MEDPROMPT_RESPONSES = 3
MEDPROMPT_VOTES = 5
REFINE_ROUNDS = 2
DEBATE = ("Compare your previous answer with the other expert's answer and point out any mistake in either; "
          "then give your final answer. ")


@dataclass(frozen=True)
class FamilyParts:
    """What differs between families: how one answer is asked for, and the instructions and personas."""

    call_args: str
    """``__call__``'s parameters after ``self`` (the family's convention)."""
    answer_op: str
    """The operator that produces an answer from (problem, instruction)."""
    answer_call: str
    """The awaited call producing one answer string; ``{instruction}`` and ``{problem}`` are filled in."""
    io: str
    cot: tuple[str, ...]
    personas: tuple[str, str]
    finish_with_format: bool = False
    """QA: shorten a reasoning text to the answer before returning (outputs are scored by token F1)."""


FAMILY_PARTS: dict[str, FamilyParts] = {
    "code": FamilyParts(
        call_args="problem: str, entry_point: str",
        answer_op="CustomCodeGenerate",
        answer_call='(await self.answer(problem={problem}, entry_point=entry_point, instruction={instruction}))'
                    '["response"]',
        io="Write the code directly, without any explanation.",
        cot=("Let's think step by step: analyse the problem first, then write the code.",
             "Break the task into smaller steps and reason through each one, then write the code.",
             "First list the edge cases the function must handle, then write the code.",
             "Explain the algorithm you will use step by step, then write the code.",
             "Trace the examples in the problem by hand to understand it, then write the code."),
        personas=("a senior Python engineer who writes clean and correct code",
                  "a test engineer who hunts for edge cases and failure modes"),
    ),
    "math": FamilyParts(
        call_args="problem: str",
        answer_op="Custom",
        answer_call='(await self.answer(input={problem}, instruction={instruction}))["response"]',
        io="Give only the final answer, as \\boxed{...}, without any explanation.",
        cot=("Let's think step by step. Solve the problem, then give the final answer as \\boxed{...}.",
             "Break the problem into smaller steps and solve each one; give the final answer as \\boxed{...}.",
             "Solve the problem, explaining the reasoning behind each step; give the final answer as \\boxed{...}.",
             "Work through the problem carefully, checking every calculation; give the final answer as "
             "\\boxed{...}.",
             "First restate what is asked, then reason step by step to the solution; give the final answer as "
             "\\boxed{...}."),
        personas=("a meticulous mathematician who justifies every step",
                  "a competition coach who checks every answer with a second method"),
    ),
    "qa": FamilyParts(
        call_args="problem: str",
        answer_op="Custom",
        answer_call='(await self.answer(input={problem}, instruction={instruction}))["response"]',
        io="Answer the question with only the answer (a few words or a number), without any explanation.",
        cot=("Let's think step by step: find the facts in the context that the question needs, reason to the "
             "answer, and end with the short answer.",
             "Break the question into sub-questions, answer each from the context, and end with the short answer.",
             "Quote the sentences of the context that matter, reason from them, and end with the short answer.",
             "Reason carefully about what exactly is asked, check it against the context, and end with the short "
             "answer.",
             "Identify the entities and numbers involved, work out the answer step by step, and end with the short "
             "answer."),
        personas=("a careful reader who sticks to the exact words of the context",
                  "a skeptical fact checker who verifies every claim and number against the context"),
        finish_with_format=True,
    ),
}


def _answer(parts: FamilyParts, instruction: str, problem: str = "problem") -> str:
    return parts.answer_call.format(problem=problem, instruction=instruction)


def _finish(parts: FamilyParts, var: str) -> str:
    if parts.finish_with_format:
        return f'return (await self.format(problem=problem, solution={var}))["solution"]'
    return f"return {var}"


def _body_io(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    return [], f"return {_answer(parts, 'IO')}"


def _body_cot(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    if family == "qa":  # AnswerGenerate is CoT: a thought, then a concise answer
        return ["AnswerGenerate"], 'return (await self.answer_generate(input=problem))["answer"]'
    return [], f"return {_answer(parts, 'COT[0]')}"


def _body_cot_sc(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    return ["ScEnsemble"], "\n".join([
        f"samples = await asyncio.gather(*[self._cot(problem{', entry_point' if family == 'code' else ''}, "
        f"COT[i]) for i in range({SC_SAMPLES})])",
        'best = (await self.sc_ensemble(solutions=list(samples), problem=problem))["response"]',
        _finish(parts, "best"),
    ])


def _body_medprompt(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    ep = ", entry_point" if family == "code" else ""
    return ["ScEnsemble"], "\n".join([
        f"candidates = list(await asyncio.gather(*[self._cot(problem{ep}, COT[i]) "
        f"for i in range({MEDPROMPT_RESPONSES})]))",
        "votes = [0] * len(candidates)",
        "if len(set(candidates)) > 1:",
        f"    for vote in range({MEDPROMPT_VOTES}):",
        "        order = list(range(len(candidates)))",
        "        random.Random(vote).shuffle(order)",
        "        shuffled = [candidates[i] for i in order]",
        '        picked = (await self.sc_ensemble(solutions=shuffled, problem=problem))["response"]',
        "        votes[candidates.index(picked) if picked in candidates else 0] += 1",
        "best = candidates[votes.index(max(votes))]",
        _finish(parts, "best"),
    ])


def _body_multipersona(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    ep = ", entry_point" if family == "code" else ""
    return ["ScEnsemble"], "\n".join([
        f'opening = await asyncio.gather(*[self._cot(problem{ep}, f"You are {{persona}}. " + COT[0]) '
        f"for persona in PERSONAS])",
        'debate = [problem + "\\n\\nYour previous answer:\\n" + opening[i] + "\\n\\nThe other expert\'s answer:\\n" '
        "+ opening[1 - i] for i in range(2)]",
        f'final = await asyncio.gather(*[self._cot(debate[i]{ep}, f"You are {{PERSONAS[i]}}. " + DEBATE + COT[0]) '
        f"for i in range(2)])",
        'best = (await self.sc_ensemble(solutions=list(final), problem=problem))["response"]',
        _finish(parts, "best"),
    ])


def _body_self_refine(parts: FamilyParts, family: str) -> tuple[list[str], str]:
    return ["Review", "Revise"], "\n".join([
        f"solution = {_answer(parts, 'COT[0]')}",
        f"for _ in range({REFINE_ROUNDS}):",
        "    review = await self.review(problem=problem, solution=solution)",
        '    if review["review_result"]:',
        "        break",
        '    solution = (await self.revise(problem=problem, solution=solution, feedback=review["feedback"]))'
        '["solution"]',
        _finish(parts, "solution"),
    ])


_BODIES = {"io": _body_io, "cot": _body_cot, "cot_sc": _body_cot_sc, "medprompt": _body_medprompt,
           "multipersona": _body_multipersona, "self_refine": _body_self_refine}
_ATTRIBUTES = {"AnswerGenerate": "answer_generate", "ScEnsemble": "sc_ensemble", "Review": "review",
               "Revise": "revise", "Format": "format"}


def canonical_baseline(name: str) -> str:
    """``"CoT SC"``, ``"cot-sc"``, ``"Self_Refine"`` -> the key in :data:`BASELINES`; unknown names raise."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return key


@functools.cache
def baseline_workflow(name: str, family: str) -> str:
    """The workflow text of baseline ``name`` for ``family`` (``code``, ``math`` or ``qa``)."""
    method = canonical_baseline(name)
    if family not in FAMILY_PARTS:
        raise ValueError(f"unknown workflow family {family!r}; expected one of {list(FAMILY_PARTS)}")
    parts = FAMILY_PARTS[family]
    extra_ops, body = _BODIES[method](parts, family)
    if parts.finish_with_format and "self.format(" in body:
        extra_ops = [*extra_ops, "Format"]
    inits = [f"self.answer = operator.{parts.answer_op}(llm)"]
    inits += [f"self.{_ATTRIBUTES[op]} = operator.{op}(llm)" for op in extra_ops]
    ep_param = ", entry_point: str" if family == "code" else ""
    lines = [
        f'"""Baseline {DISPLAY_NAMES[method]} ({family} family), built into spogw (spogw/baselines.py)."""',
        "import asyncio",
        "import random",
        "",
        f"IO = {parts.io!r}",
        f"COT = {parts.cot!r}",
        f"PERSONAS = {parts.personas!r}",
        f"DEBATE = {DEBATE!r}",
        "",
        "",
        "class Workflow:",
        "    def __init__(self, llm) -> None:",
        *(f"        {line}" for line in inits),
        "",
        f"    async def _cot(self, problem: str{ep_param}, instruction: str) -> str:",
        f"        return {_answer(parts, 'instruction')}",
        "",
        f"    async def __call__(self, {parts.call_args}):",
        *(f"        {line}" for line in body.splitlines()),
    ]
    return "\n".join(lines) + "\n"
