"""Guided sampling through the engine, one grammar segment per request: the model decodes only its decisions.

A guided workflow is mostly forced text (the header, the chosen option's code, the return): with the whole
grammar as one structured-output regex, the server decodes every forced token as a step of its own (~300 steps
for a ~300-token workflow, ~10-30 of them free). Here the client walks the family's grammar
(:class:`spogw.workflows.guide.Guide`) and asks the server only for the free parts, each under a small regex:

* a **choice** among the step's options: the options' leading text as an alternation, a few tokens at most,
  until one option is determined; then its whole leading text is appended as forced text;
* an **instruction**: ``SLOT_TEXT{1,slot_chars}"`` (printable ASCII without quote or backslash, then the
  closing quote), at most ``slot_tokens`` + 1 tokens; one cut short is closed by the client.

Every request sends the prompt and the workflow so far as token ids — the tokens sampled so far and the forced
segments encoded one by one, exactly the sequence the fit trains on (``Completion.token_ids``; a re-tokenisation
of the text would be another context than the one the model chose in). vLLM's prefix cache holds the earlier part, so
the forced text is prefilled in one batched pass instead of decoded token by token — the server-side
counterpart of the transformers decoder feeding forced runs in one pass
(:func:`spogw.workflows.guided_decoding.guided_generate`).
Choices and instructions are sampled from the model's own distribution restricted to the grammar, as there.
The result matches :meth:`Guide.regex` (a test checks every sample).
"""

from __future__ import annotations

from spogw.workflows.guide import CLOSE, SLOT, SLOT_TEXT, Guide, _body, _escape

CHOICE_TOKENS = 4
"""Tokens asked for per choice request (options differ within their first token or two)."""


class GuidedWalk:
    """One workflow being written: the grammar's state, the text so far, and what to ask the server next."""

    def __init__(self, guide: Guide, encode):
        self.guide, self.encode = guide, encode
        self.text = guide.prefix
        self.ids: list[int] = list(encode(guide.prefix))  # the workflow's tokens as the model saw them
        self.exact = True  # False once a reply came without its token ids (then none are recorded)
        self.position = 0  # the step being chosen (0 = `first`)
        self.done = False
        self._pending: list[str] = []  # the chosen option's literals after its slots
        self._alternatives: list[tuple[int, str]] | None = None  # (option index, rest of its head) while choosing
        self._start_step()

    def _start_step(self) -> None:
        if self.position > self.guide.max_then:
            self._finish(_body(self.guide.end) + CLOSE)
            return
        options = self.guide.step_options(self.position)
        self._alternatives = [(i, _body(o).split(SLOT)[0]) for i, o in enumerate(options)]

    def _finish(self, text: str) -> None:
        self.text += text
        self.ids += self.encode(text)
        self.done = True

    def result(self):
        """The workflow text, carrying its token ids (:class:`spogw.completions.Completion`) when all are known."""
        from spogw.completions import Completion

        return Completion(self.text, self.ids if self.exact and self.done else None)

    def request(self) -> tuple[str, int]:
        """``(regex, max_tokens)`` of the next request (the walk must not be done)."""
        if self._alternatives is not None:
            return "(?:" + "|".join(_escape(rest) for _, rest in self._alternatives) + ")", CHOICE_TOKENS
        return f"{SLOT_TEXT}{{1,{self.guide.slot_chars}}}\"", self.guide.slot_tokens + 1

    def take(self, output: str, token_ids: list[int] | None = None) -> None:
        """Advance by the server's ``output`` (and the ``token_ids`` it sampled) for :meth:`request`."""
        if token_ids is None:
            self.exact = False
        else:
            self.ids += [int(t) for t in token_ids]
        if self._alternatives is not None:
            self._take_choice(output)
        else:
            self._take_instruction(output)

    def _take_choice(self, output: str) -> None:
        matching = [(i, rest) for i, rest in self._alternatives if rest.startswith(output) or output.startswith(rest)]
        if not matching or not output:
            raise ValueError(f"the engine's choice {output!r} matches no option of the grammar")
        if len(matching) > 1:  # not decided yet: keep what was written, choose among the rest
            self.text += output
            self._alternatives = [(i, rest[len(output):]) for i, rest in matching]
            return
        index, rest = matching[0]
        if rest.startswith(output):
            self.ids += self.encode(rest[len(output):]) if len(rest) > len(output) else []
        else:
            self.exact = False
        self.text += rest
        self._alternatives = None
        option = self.guide.step_options(self.position)[index]
        self._pending = _body(option).split(SLOT)[1:]
        self._is_end = self.position > 0 and index == len(self.guide.then)
        self._after_literal()

    def _take_instruction(self, output: str) -> None:
        free = output[:-1] if output.endswith('"') else output  # cut short: the client closes it
        free = "".join(c for c in free if c not in '"\\\n' and c.isascii() and c.isprintable())
        free = free[:self.guide.slot_chars] or "Solve it."
        literal = self._pending.pop(0)  # begins with the closing quote
        if output == free + '"':
            self.ids += self.encode(literal[1:]) if len(literal) > 1 else []
        elif output == free:
            self.ids += self.encode(literal)
        else:
            self.exact = False
        self.text += free + literal
        self._after_literal()

    def _after_literal(self) -> None:
        if self._pending:
            return  # an instruction comes next
        if self._is_end:
            self._finish(CLOSE)
            return
        self.position += 1
        self._start_step()
