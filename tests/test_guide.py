"""Guided sampling: the family grammars, their regular expressions and the token-level decoder."""

from __future__ import annotations

import re

import pytest

from spogw.workflows.families import FAMILIES
from spogw.workflows.guide import Guide, load_guide
from spogw.workflows.guided_decoding import TokenGuide, guided_generate
from spogw.workflows.parsing import InvalidWorkflow, parse_workflow

QUESTION = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'


@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_of_every_grammar_is_a_valid_workflow_in_its_regex(family):
    guide = load_guide(family)
    pattern = re.compile(guide.regex())
    paths = guide.paths()
    assert len(paths) == len(guide.first) * sum((len(guide.then)) ** k for k in range(guide.max_then + 1))
    for path in paths:
        text = guide.render(path, ["Check the edge cases first", "Plan, then answer"])
        parsed = parse_workflow(text, family=family)
        assert parsed.class_name == "Workflow"
        assert pattern.fullmatch(text), path
    # what the grammar excludes, the regex excludes
    text = guide.render(paths[0], ["fine"])
    assert not pattern.fullmatch(text.replace("</graph>", "import os\n</graph>"))
    if '"fine"' in text:
        assert not pattern.fullmatch(text.replace('"fine"', '"a"quote"'))
        assert not pattern.fullmatch(text.replace('"fine"', '""'))  # an instruction is never empty


def _guide(**changes) -> dict:
    data = {"header": "class Workflow:\n    async def __call__(self, problem: str):",
            "first": ['solution = (await self.custom(input=problem, instruction="{instruction}"))["response"]'],
            "end": "return solution"}
    data.update(changes)
    return data


@pytest.mark.parametrize(("changes", "message"), [
    ({"header": None}, "`guide.header` is missing"),
    ({"first": []}, "`guide.first` needs at least one option"),
    ({"first": ["{instruction} = 1"]}, "must not begin with {instruction}"),
    ({"first": ["x = '{instruction}'"]}, "inside a double-quoted string"),
    ({"first": ["x = 1", "x = 1\ny = 2"]}, "begin alike"),
    ({"surprise": 1}, "unknown `guide` fields ['surprise']"),
    ({"end": 'return "{instruction}"'}, "may appear only in"),
])
def test_malformed_grammars_are_named(changes, message):
    data = _guide(**changes)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        Guide.from_dict("code", data, "families/x.yaml")
    assert "families/x.yaml" in str(info.value)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    import torch

    from spogw.models import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    return load_causal_lm(tiny_model).eval(), load_tokenizer(tiny_model)


def _prompt(tok, family="code") -> list[int]:
    from spogw.generation import generator_messages

    text = tok.apply_chat_template(generator_messages(family, QUESTION), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_random_model_writes_only_valid_workflows_when_guided(tiny, family):
    model, tok = tiny
    guide = TokenGuide(load_guide(family), tok)
    texts, fed = guided_generate(model, _prompt(tok, family), guide, n=6, temperature=1.0, top_p=1.0,
                                 max_new_tokens=2000, seed=1)
    assert len(texts) == 6 and fed > 0
    pattern = re.compile(guide.guide.regex())
    for text in texts:
        parse_workflow(text, family=family)
        assert pattern.fullmatch(text)
        for instruction in re.findall(r'instruction="([^"]*)"', text):
            assert 1 <= len(tok(instruction, add_special_tokens=False)["input_ids"]) <= 2 * guide.guide.slot_tokens
            assert instruction.isascii() and instruction.isprintable()
    assert len(set(texts)) > 1  # sampled, not one fixed text


def test_instructions_are_printable_ascii_without_quote_or_backslash(tiny):
    """A multi-byte character can be cut between two tokens (half a character is another token sequence than
    the text's, and the engine garbles a prompt that ends inside one): instructions are ASCII on both paths."""
    _, tok = tiny
    guide = load_guide("qa")
    pattern = re.compile(guide.regex())
    good = guide.render([1, 2], ["Answer with a number, a name or a few words [1-3]."] * 8)
    assert pattern.fullmatch(good)
    for bad in ("Answer briefly 😑", "Réponds", 'Say "yes"', "a\\b"):
        assert not pattern.fullmatch(guide.render([1, 2], [bad] * 8)), bad
    free = TokenGuide(guide, tok).free
    strings = TokenGuide(guide, tok).strings
    assert free.any() and all(strings[i].isascii() and '"' not in strings[i] for i in free.nonzero().flatten())


def test_seeded_sampling_repeats_and_batched_feeding_changes_nothing(tiny):
    """Feeding forced runs in one padded pass must decode exactly what feeding one token per pass decodes."""
    model, tok = tiny
    guide = TokenGuide(load_guide("code"), tok)
    kwargs = dict(n=4, top_p=0.9, max_new_tokens=2000)
    greedy_run = guided_generate(model, _prompt(tok), guide, temperature=0.0, seed=0, **kwargs)[0]
    greedy_step = guided_generate(model, _prompt(tok), guide, temperature=0.0, seed=0, max_run=1, **kwargs)[0]
    assert greedy_run == greedy_step
    assert len(set(greedy_run)) == 1  # greedy rows agree
    first = guided_generate(model, _prompt(tok), guide, temperature=1.0, seed=5, **kwargs)[0]
    again = guided_generate(model, _prompt(tok), guide, temperature=1.0, seed=5, **kwargs)[0]
    assert first == again  # (sampling after a padded pass vs one token per pass may differ in the last float bits)


def test_a_row_over_the_token_budget_stops_and_is_invalid(tiny):
    model, tok = tiny
    guide = TokenGuide(load_guide("code"), tok)
    header = len(guide.encode(guide.guide.prefix))
    texts, _ = guided_generate(model, _prompt(tok), guide, n=2, temperature=1.0, top_p=1.0,
                               max_new_tokens=header + 5, seed=0)
    for text in texts:
        with pytest.raises(InvalidWorkflow):
            parse_workflow(text, family="code")


def test_the_sample_stage_samples_guided(tiny_model, tmp_path):
    """An untrained model writes no valid workflow freely; guided, every sample is valid and recorded so."""
    from spogw.benchmarks.base import Record
    from spogw.generation import TransformersGenerator
    from spogw.sampling import NoValidWorkflows, SamplingOptions, sample

    records = [Record(id=f"q{i}", benchmark="humaneval", family="code", question=QUESTION, answer="",
                      entry_point="add") for i in range(2)]
    gen = TransformersGenerator(tiny_model, batch_size=3)
    options = SamplingOptions(m=3, temperature=1.0, max_new_tokens=600, max_resample=0, guided=True)
    stats = sample(records, tmp_path / "samples.jsonl", generator=gen, options=options)
    assert stats["samples"] == 6 and stats["valid"] == 6
    assert gen.stats.batches == 2 and gen.stats.generated_tokens > 0
    free = SamplingOptions(m=2, temperature=1.0, max_new_tokens=40, max_resample=0)
    with pytest.raises(NoValidWorkflows):
        sample(records, tmp_path / "free.jsonl", generator=gen, options=free)
