"""Token-level guided decoding: a :class:`~spogw.workflows.guide.Guide` bound to a tokenizer, sampled in-process.

:func:`guided_generate` writes ``n`` workflows for one prompt inside the family grammar with a transformers
model: the shared prompt and the grammar's header are prefilled once, runs of forced tokens are fed in one
forward pass, and the model samples only the decisions (a step among the options, the tokens of an
instruction), from its own probabilities restricted to what the grammar allows there. Each row records the
token ids it was fed and sampled (:class:`GuidedRow`), so the fit can train on exactly that sequence. The
server-side counterpart, for an engine with regex-constrained decoding, is
:mod:`spogw.generation.guided_server`.
"""

from __future__ import annotations

import functools
from collections import deque

from spogw.workflows.guide import CLOSE, SLOT, Guide, _body


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
