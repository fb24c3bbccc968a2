"""Guided sampling: the generator writes its workflow inside the family's workflow grammar.

A model too small to write a workflow class freely (the embedded SmolLM2-135M wrote 0 valid
workflows of 16 from the family prompt: it writes a plain function, or prose) can still make the
decisions a workflow consists of: *which* operators to chain, in what order, and *what to instruct
them*. Guided sampling (``--sampling.guided true``) lets it make exactly those decisions, with its own
probabilities, and forces everything else. The grammar is data (``guide:`` in
``families/<family>.yaml``)::

    <graph>
    {header}              forced: the class, a constructor creating every operator, the __call__ line
        one of `first`    chosen: the step that makes the first answer
        up to `max_then`  chosen: refining steps from `then`, or `end` early
        {end}             forced once `max_then` steps are taken: the return
    </graph>

Inside a step, ``{instruction}`` marks an instruction string the generator writes freely: 1 to
``slot_tokens`` tokens of printable ASCII without quotes or backslashes (so the string
literal stays a string literal). The result is ordinary workflow text: the same validation, the same
sandbox, the same records as free sampling. Training takes the policy gradient on the model's decisions
only (:meth:`Guide.decisions`, ``--data.train_on decisions``): the forced frame is no choice of the
policy's. Every path through a grammar is a valid workflow (a test renders them all).

Two decoders read one :class:`Guide`: :class:`~spogw.workflows.guided_decoding.TokenGuide`
(:mod:`spogw.workflows.guided_decoding`) drives token-level constrained sampling in
:class:`spogw.generation.TransformersGenerator` (the shared prompt and the header are prefilled once per
query, runs of forced tokens are fed in one forward pass), and :meth:`Guide.regex` gives the same
language as a regular expression for engines with regex-constrained decoding (vLLM's structured outputs).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Any

SLOT = "{instruction}"
OPEN, CLOSE = "<graph>\n", "</graph>"
INDENT = " " * 8
SLOT_TEXT = r'[ !#-\[\]-~]'
"""One character of an instruction: printable ASCII but a quote or a backslash (no newline, no emoji: a
multi-byte character could be cut between two tokens, and the half would be a different token sequence than the
text's; the engine's incremental detokeniser also garbles a prompt that ends inside a character)."""


@dataclass(frozen=True)
class Guide:
    """A family's workflow grammar (see the module docstring). Options are code at ``__call__``'s indentation."""

    family: str
    header: str
    first: tuple[str, ...]
    then: tuple[str, ...]
    end: str
    max_then: int = 2
    slot_tokens: int = 24

    @classmethod
    def from_dict(cls, family: str, data: Any, where: str) -> Guide:
        """Read and check the ``guide:`` mapping of a family file; errors name the file and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: `guide` must be a mapping")
        unknown = set(data) - {"header", "first", "then", "end", "max_then", "slot_tokens"}
        if unknown:
            raise ValueError(f"{where}: unknown `guide` fields {sorted(unknown)}")
        for key in ("header", "first", "end"):
            if key not in data:
                raise ValueError(f"{where}: `guide.{key}` is missing")
        for key in ("first", "then"):
            options = data.get(key) or []
            if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
                raise ValueError(f"{where}: `guide.{key}` must be a list of non-empty code strings")
        guide = cls(family, data["header"].rstrip() + "\n", tuple(o.strip("\n") for o in data["first"]),
                    tuple(o.strip("\n") for o in data.get("then") or ()), data["end"].strip("\n"),
                    int(data.get("max_then", 2)), int(data.get("slot_tokens", 24)))
        guide.check(where)
        return guide

    def check(self, where: str) -> None:
        if not self.first:
            raise ValueError(f"{where}: `guide.first` needs at least one option")
        if self.max_then < 0 or self.slot_tokens < 1:
            raise ValueError(f"{where}: `guide.max_then` must be >= 0 and `guide.slot_tokens` >= 1")
        if SLOT in self.header or SLOT in self.end:
            raise ValueError(f"{where}: {SLOT} may appear only in `guide.first` and `guide.then` options")
        for key, options in (("first", self.first), ("then", self.then + (self.end,))):
            for i, option in enumerate(options):
                parts = option.split(SLOT)
                if not parts[0]:
                    raise ValueError(f"{where}: guide.{key}[{i}] must not begin with {SLOT} (a choice is made "
                                     "on the text before it)")
                if any(not p.startswith('"') for p in parts[1:]):
                    raise ValueError(f"{where}: guide.{key}[{i}]: every {SLOT} must sit inside a double-quoted "
                                     'string, as in instruction="{instruction}"')
            heads = [_body(o).split(SLOT)[0] for o in options]
            for a, b in itertools.permutations(range(len(heads)), 2):
                if heads[b].startswith(heads[a]):
                    raise ValueError(f"{where}: guide.{key}[{a}] and guide.{key}[{b}] begin alike up to the "
                                     "first {instruction}: the choice between them would be ambiguous")

    # -- the language --------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """Forced text every workflow starts with."""
        return OPEN + self.header

    def step_options(self, position: int) -> tuple[str, ...]:
        """The options at step ``position`` (0 = `first`); the last of a `then` step is `end`."""
        return self.first if position == 0 else self.then + (self.end,)

    def render(self, choices: list[int], instructions: list[str] | None = None) -> str:
        """The workflow text of one path: option indices per step, and the instructions in order."""
        fill = iter(instructions or [])
        text = self.prefix
        for position, choice in enumerate(choices):
            option = self.step_options(position)[choice]
            text += _body(option).replace(SLOT, "{}").format(*(next(fill, "Think step by step.")
                                                                for _ in range(option.count(SLOT))))
            if position > 0 and choice == len(self.then):
                break
        else:
            text += _body(self.end)
        return text + CLOSE

    def paths(self) -> list[list[int]]:
        """Every path of choices through the grammar (for tests and docs)."""
        out: list[list[int]] = []

        def walk(prefix: list[int]) -> None:
            steps_taken = len(prefix) - 1
            if steps_taken == self.max_then:
                out.append(prefix)
                return
            for j in range(len(self.then) + 1):
                (out.append(prefix + [j]) if j == len(self.then) else walk(prefix + [j]))

        for i in range(len(self.first)):
            walk([i])
        return out

    @property
    def slot_chars(self) -> int:
        """Most characters of one instruction (the regex's bound; the token decoder keeps to it as well)."""
        return 16 * self.slot_tokens

    def regex(self) -> str:
        """The grammar as a regular expression; an instruction is 1 to :attr:`slot_chars` characters other than a
        quote, a backslash or a newline."""
        slot = f"{SLOT_TEXT}{{1,{self.slot_chars}}}"

        def option(o: str) -> str:
            return slot.join(_escape(p) for p in _body(o).split(SLOT))

        first = "(?:" + "|".join(option(o) for o in self.first) + ")"
        then = "(?:" + "|".join(option(o) for o in self.then) + ")" if self.then else None
        tail = _escape(_body(self.end))
        middle = ""
        for _ in range(self.max_then) if then else ():
            middle = f"(?:{tail}|{then}{middle or tail})"
        return _escape(self.prefix) + first + (middle or tail) + _escape(CLOSE)


    def parse(self, text: str) -> Parsed | None:
        """Recover the path through this grammar that wrote ``text``: the option chosen at each step, the
        instructions, and the character spans of every decision; None when ``text`` is not such a workflow."""
        if not text.startswith(self.prefix):
            return None
        pos, spans, choices, instructions = len(self.prefix), [], [], []
        for position in range(self.max_then + 1):
            options = self.step_options(position)
            bodies = [_body(o) for o in options]
            heads = [b.split(SLOT)[0] for b in bodies]
            matched = next(((i, m) for i, b in enumerate(bodies) if (m := _match_option(b, text, pos)) is not None),
                           None)
            if matched is None:
                return None
            i, (end, slots) = matched
            if len(options) > 1:
                shared = max(_common_prefix(heads[i], heads[j]) for j in range(len(heads)) if j != i)
                spans.append((pos, pos + shared + 1))  # the character that tells it from the rest
            spans.extend(slots)
            instructions.extend(text[a:b - 1] for a, b in slots)
            choices.append(i)
            pos = end
            if position > 0 and i == len(self.then):
                break
        else:
            if not text.startswith(_body(self.end), pos):
                return None
            pos += len(_body(self.end))
        if text[pos:] != CLOSE:
            return None
        return Parsed(tuple(choices), tuple(instructions), tuple(spans))

    def decisions(self, text: str) -> list[tuple[int, int]] | None:
        """Character spans of the generator's own decisions in a workflow this grammar produced, or None when
        ``text`` is not one (a freely written workflow).

        A decision is what the guided decoder let the model choose: at each step, the characters up to the one
        that tells the chosen option from every other (``plan`` vs ``solution`` vs ``candidates``), and each
        instruction's text with its closing quote (where the model chose to stop). Everything else was forced.
        Training on these tokens alone (``--data.train_on decisions``) gives the policy gradient to the choices;
        on the whole text, the forced frame's ~200 tokens would drown the one token that chose the structure.
        """
        parsed = self.parse(text)
        return None if parsed is None else list(parsed.spans)

    def structure(self, choices: tuple[int, ...]) -> str:
        """A path as the operators it calls, e.g. ``Custom+CustomCodeGenerate > Review+Revise``."""
        steps = []
        for position, choice in enumerate(choices):
            if position > 0 and choice == len(self.then):
                break
            option = self.step_options(position)[choice]
            ops = []
            for name in _OPERATOR_CALL.findall(option):
                op = self._attributes().get(name, name)
                if not ops or ops[-1] != op:
                    ops.append(op)
            steps.append("+".join(ops))
        return " > ".join(steps)

    def _attributes(self) -> dict[str, str]:
        """``self.<attribute>`` -> operator name, from the header's constructor."""
        return dict(re.findall(r"self\.(\w+) = operator\.(\w+)\(", self.header))


@dataclass(frozen=True)
class Parsed:
    """A guided workflow read back: option index per step, its instructions, and its decision spans."""

    choices: tuple[int, ...]
    instructions: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


_OPERATOR_CALL = re.compile(r"self\.(\w+)\(")


def _match_option(body: str, text: str, pos: int) -> tuple[int, list[tuple[int, int]]] | None:
    """Match one option's text at ``pos``: (end position, the spans of its instructions with their closing quote)."""
    parts = body.split(SLOT)
    if not text.startswith(parts[0], pos):
        return None
    pos += len(parts[0])
    slots = []
    for part in parts[1:]:  # every part after a slot begins with the closing quote
        end = text.find('"', pos)
        if end <= pos or any(c in text[pos:end] for c in "\\\n") or not text.startswith(part, end):
            return None
        slots.append((pos, end + 1))
        pos = end + len(part)
    return pos, slots


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _body(option: str) -> str:
    """An option as it appears in the workflow: indented into ``__call__``, ending with a newline."""
    return "".join(INDENT + line + "\n" if line.strip() else "\n" for line in option.split("\n"))


def _escape(text: str) -> str:
    """Regex-escape with the conservative escapes every regex engine reads (no ``\\ `` for spaces)."""
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else ("\\n" if c == "\n" else c) for c in text)


@functools.cache
def load_guide(family: str) -> Guide:
    """The grammar of ``family`` (``guide:`` in its YAML file)."""
    from spogw.workflows.families import HERE, _read_yaml, load_family

    load_family(family)  # checks the name and the file
    path = HERE / "families" / f"{family}.yaml"
    data = _read_yaml(path)
    if "guide" not in data:
        raise ValueError(f"{path}: no `guide` section; guided sampling needs one (see spogw/workflows/guide.py)")
    return Guide.from_dict(family, data["guide"], str(path))


