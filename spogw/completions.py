"""A generated completion that remembers the exact tokens it was sampled as.

RL must train on the tokens the policy sampled, not on a re-tokenisation of their text: the guided decoder
feeds the grammar's fixed text segment by segment, so ``":\\n" + "       " + " plan"`` is what the model saw,
while tokenising the finished text gives ``":" + "\\n       " + " plan"``; the probability that training raises
would then be the one of a context the sampler never uses. Backends that know the sampled ids return
:class:`Completion` (a ``str``, so every consumer of texts is unchanged); the sample stage records the ids
(``completion_ids``) and the fit trains on them when they spell the same text (``spogw.data``).
"""

from __future__ import annotations


class Completion(str):
    """``str`` of the completion text, plus ``token_ids``: the sampled ids (no EOS), or None when unknown."""

    token_ids: tuple[int, ...] | None

    def __new__(cls, text: str, token_ids=None) -> Completion:
        self = super().__new__(cls, text)
        self.token_ids = None if token_ids is None else tuple(int(t) for t in token_ids)
        return self


def token_ids_of(text: str) -> list[int] | None:
    """The sampled ids of a completion, if its backend recorded them."""
    ids = getattr(text, "token_ids", None)
    return None if ids is None else list(ids)
