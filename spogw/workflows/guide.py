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
``slot_tokens`` tokens of printable text without quotes, backslashes or newlines (so the string
literal stays a string literal). The result is ordinary workflow text: the same validation, the same
sandbox, the same records as free sampling. Training takes the policy gradient on the model's decisions
only (:meth:`Guide.decisions`, ``--data.train_on decisions``): the forced frame is no choice of the
policy's. Every path through a grammar is a valid workflow (a test renders them all).

Two decoders read one :class:`Guide`: :class:`TokenGuide` drives token-level constrained sampling in
:class:`spogw.generation.TransformersGenerator` (the shared prompt and the header are prefilled once per
query, runs of forced tokens are fed in one forward pass), and :meth:`Guide.regex` gives the same
language as a regular expression for engines with regex-constrained decoding (vLLM's structured outputs).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import deque
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


# -- token-level decoding -----------------------------------------------------------------------------


class TokenGuide:
    """A :class:`Guide` bound to a tokenizer: the token sets the constrained decoder needs, computed once."""

    def __init__(self, guide: Guide, tokenizer):
        import torch

        self.guide, self.tokenizer = guide, tokenizer
        size = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0))
        special = set(tokenizer.all_special_ids)
        self.strings = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        if i not in special else "" for i in range(size)]
        ok = [bool(s) and s.isascii() and s.isprintable() and '"' not in s and "\\" not in s
              for s in self.strings]
        self.free = torch.tensor(ok, dtype=torch.bool)
        """Tokens an instruction may consist of."""
        self.lengths = torch.tensor([len(s) for s in self.strings])
        self.quote_tokens = [i for i, s in enumerate(self.strings) if s.startswith('"') and i not in special]
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._tries: dict[int, dict] = {}

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one TokenGuide per generator, a handful of literals
    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    @functools.lru_cache(maxsize=256)  # noqa: B019
    def terminators(self, literal: str) -> tuple[int, ...]:
        """Tokens that end an instruction: those spelling a prefix of the literal after it (``"))...``)."""
        return tuple(i for i in self.quote_tokens if literal.startswith(self.strings[i]))

    def trie(self, position: int) -> dict:
        """Token trie of the options' leading text at step ``position`` (leaf: ``{None: option index}``)."""
        key = min(position, 1)
        if key not in self._tries:
            root: dict = {}
            for index, option in enumerate(self.guide.step_options(key)):
                node = root
                for token in self.encode(_body(option).split(SLOT)[0]):
                    if None in node:
                        node = {None: None}
                        break
                    node = node.setdefault(token, {})
                if node:
                    raise ValueError(f"guide of {self.guide.family}: option {index} at step {key} is a token prefix "
                                     "of another")
                node[None] = index
            self._tries[key] = root
        return self._tries[key]

    def row(self) -> GuidedRow:
        return GuidedRow(self)


class GuidedRow:
    """One sequence being decoded under a guide: which tokens may come next, and the text so far.

    The header is not decoded (the decoder prefills it with the prompt); the row starts at the first
    choice. ``forced`` holds tokens that are already determined.
    """

    def __init__(self, tg: TokenGuide):
        self.tg, self.guide = tg, tg.guide
        self.text: list[str] = [self.guide.prefix]
        self.ids: list[int] = list(tg.encode(self.guide.prefix))  # every token of the completion, as sampled/fed
        self.forced: deque[int] = deque()
        self.done = False
        self.ends_after_forced = False  # the forced tokens are the workflow's last text
        self.choices: list[int] = []
        self._node: dict | None = None  # inside a choice: the trie node reached
        self._slot: tuple[int, str] | None = None  # inside an instruction: (tokens so far, literal after it)
        self._chars = 0  # characters of the current instruction
        self._rest: deque[str] = deque()  # literals after the slots of the chosen option
        self._start_step()

    # the grammar's walk ------------------------------------------------------------------------
    def _start_step(self) -> None:
        position = len(self.choices)
        if position > self.guide.max_then:
            self._literal(_body(self.guide.end) + CLOSE)
            self.ends_after_forced = True
            return
        self._node = self.tg.trie(position)

    def _chosen(self, index: int) -> None:
        position = len(self.choices)
        self.choices.append(index)
        option = self.guide.step_options(position)[index]
        parts = _body(option).split(SLOT)
        self.text.append(parts[0])
        self._rest = deque(parts[1:])
        self._node = None
        self._after_literal(is_end=position > 0 and index == len(self.guide.then))

    def _after_literal(self, is_end: bool = False) -> None:
        if self._rest:
            self._slot = (0, self._rest.popleft())
        elif is_end:
            self._literal(CLOSE)
            self.ends_after_forced = True
        else:
            self._start_step()

    def _literal(self, text: str) -> None:
        self.text.append(text)
        self.forced.extend(self.tg.encode(text))

    # the decoder's interface -------------------------------------------------------------------
    def allowed(self):
        """The tokens allowed next: an int (forced), a list of ids, or a bool mask over the vocabulary."""
        if self.done:
            return self.tg.eos
        if self.forced:
            return self.forced[0]
        if self._node is not None:
            options = [t for t in self._node if t is not None]
            return options[0] if len(options) == 1 else options
        count, literal = self._slot
        ends = list(self.tg.terminators(literal)) if count else []
        if count >= self.guide.slot_tokens:
            return ends
        mask = self.tg.free & (self.tg.lengths <= self.guide.slot_chars - self._chars)
        if not count:
            return mask
        mask[ends] = True
        return mask

    def advance(self, token: int) -> None:
        if self.done:
            return
        if self.forced:
            expected = self.take_forced(1)
            if [token] != expected:
                raise RuntimeError(f"guided decoding: expected forced token {expected}, got {token}")
            return
        self.ids.append(token)
        if self._node is not None:
            self._node = self._node[token]
            if None in self._node:
                self._chosen(self._node[None])
            return
        count, literal = self._slot
        piece = self.tg.strings[token]
        if count and literal.startswith(piece) and token in self.tg.terminators(literal):
            self._slot, self._chars = None, 0
            self.text.append(literal)
            rest = literal[len(piece):]
            if rest:
                self.forced.extend(self.tg.encode(rest))
            self._after_literal(is_end=False)
            return
        self.text.append(piece)
        self._slot = (count + 1, literal)
        self._chars += len(piece)

    def take_forced(self, limit: int) -> list[int]:
        """Up to ``limit`` of the forced tokens, consumed; the row is done once the last of its text is taken."""
        taken = [self.forced.popleft() for _ in range(min(limit, len(self.forced)))]
        self.ids.extend(taken)
        if self.ends_after_forced and not self.forced:
            self.done = True
        return taken

    def result(self):
        """The text, as a :class:`spogw.completions.Completion` carrying the token ids it was decoded as."""
        from spogw.completions import Completion

        text = "".join(self.text)
        spelled = "".join(self.tg.strings[i] for i in self.ids) == text  # not when cut short by the token budget
        return Completion(text, self.ids if spelled else None)


def guided_generate(model, prompt_ids, guide: TokenGuide, *, n: int, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int, max_run: int = 64) -> tuple[list[str], int]:
    """``n`` guided completions of one prompt, sharing its prefill; returns the texts and the tokens fed.

    The prompt and the grammar's header go through the model once and the cache is copied to the ``n``
    rows. Then every forward pass feeds each row its sampled token *and the forced text that follows it*
    (up to ``max_run`` tokens), right-padded to the longest row with the padding masked out of attention
    and positions kept per row: a forced line costs one pass, not one per token. Forced text that only
    ends the workflow (the return and ``</graph>``) is never fed. A row needing more than
    ``max_new_tokens`` tokens stops where it is (its text then fails validation and is re-sampled or
    recorded as invalid).
    """
    import inspect

    import torch

    rows = [guide.row() for _ in range(n)]
    header = list(guide.encode(guide.guide.prefix))
    prefix = list(prompt_ids) + header
    device = model.device
    rng = torch.Generator(device="cpu").manual_seed(seed)
    used = [len(header)] * n  # completion tokens per row
    position = torch.full((n,), len(prefix), dtype=torch.long)
    # transformers renamed the cache argument (past_key_values -> cache); speak whichever this version reads
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(n)
        attention = torch.ones((n, len(prefix)), dtype=torch.long, device=device)
        logits = out.logits[:, -1].float().expand(n, -1)
        while True:
            step = _choose(rows, logits, temperature, top_p, rng)
            feeds: list[list[int]] = []
            for i, (row, token) in enumerate(zip(rows, step, strict=True)):
                if row.done:
                    feeds.append([])
                    continue
                row.advance(token)
                feed = [token, *row.take_forced(max_run - 1)]
                if row.done:
                    feed = []  # the rest was fixed text: nothing after it depends on feeding it
                elif used[i] + len(feed) > max_new_tokens:
                    row.done = True
                    feed = []
                used[i] += len(feed)
                feeds.append(feed)
            width = max(len(f) for f in feeds)
            if width == 0:
                break
            lengths = torch.tensor([len(f) for f in feeds])
            ids = torch.tensor([f + [guide.eos] * (width - len(f)) for f in feeds], device=device)
            valid = (torch.arange(width)[None, :] < lengths[:, None]).long()
            attention = torch.cat([attention, valid.to(device)], dim=1)
            positions = position[:, None] + torch.arange(width)[None, :]
            last = (lengths - 1).clamp(min=0)
            keep = torch.unique(last)
            out = model(input_ids=ids, attention_mask=attention, position_ids=positions.to(device),
                        use_cache=True, logits_to_keep=keep.to(device), **{cache_arg: cache})
            column = torch.searchsorted(keep, last)
            logits = out.logits[torch.arange(n), column.to(device)].float()
            position += lengths
    return [r.result() for r in rows], sum(used)


def _choose(rows: list[GuidedRow], logits, temperature: float, top_p: float, rng) -> list[int]:
    import torch

    picks = []
    for row, scores in zip(rows, logits, strict=True):
        allowed = row.allowed()
        if isinstance(allowed, int):
            picks.append(allowed)
            continue
        if isinstance(allowed, list):
            if not allowed:
                raise RuntimeError("guided decoding: no token allowed (a guide bug)")
            index = torch.tensor(allowed)
            sub = scores.cpu()[index]
        else:
            index = allowed.nonzero().squeeze(1)
            sub = scores.cpu()[: allowed.shape[0]][allowed]
        if temperature == 0:
            picks.append(int(index[int(sub.argmax())]))
            continue
        probs = torch.softmax(sub / temperature, dim=-1)
        if top_p < 1:
            order = probs.argsort(descending=True)
            sorted_probs = probs[order]
            keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest head reaching top_p
            probs = torch.zeros_like(probs).index_put_((order[keep],), sorted_probs[keep])
        picks.append(int(index[int(torch.multinomial(probs, 1, generator=rng))]))
    return picks
