"""Plain values across a process boundary: the only thing a solution's process can hand to the tests.

``encode`` runs on the sending side (the solution's process S, and the tests' process T for call arguments); it
is lenient (subclasses of plain types are sent as their base type: a ``Counter`` as a dict, a namedtuple as a
tuple) and anything else becomes an *opaque* marker that carries only the object's type name and truth value.
``decode`` runs in T and is the trust boundary: it parses JSON with the stdlib's parser and builds only exact
builtin values - None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset,
range - and :class:`Opaque`, with caps on size, depth and node count. No pickle, no marshal, no object of the
sender's making: what the tests compare is always T's own value.

Why opaque markers rather than an error: some reference solutions return objects that are only tested for
truth (MBPP 737 and 787 return ``re.Match``; ``assert check_str("annie")``). An :class:`Opaque` is truthy or
falsy as the sender said (which a solution could get by returning a bool anyway), equal only to itself, and
supports nothing else, so it can pass a truth test and nothing more.

Wire format: JSON, where arrays are lists and every other container is a one-key object naming its type:
``{"t": [...]}`` tuple, ``{"s": [...]}`` set, ``{"f": [...]}`` frozenset, ``{"d": [[k, v], ...]}`` dict,
``{"b": base64}`` bytes, ``{"y": base64}`` bytearray, ``{"c": [re, im]}`` complex, ``{"r": [a, b, c]}`` range,
``{"i": hex}`` an int too long for JSON's digit limit, ``{"o": [type name, truth]}`` opaque. Floats keep their
exact value (``repr``), NaN and infinities included; strings keep lone surrogates (JSON ``\\u`` escapes).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

MAX_BYTES = 16 << 20
"""Largest encoded value accepted (a reply over it is not plain data)."""
MAX_NODES = 1_000_000
"""Most values (containers and scalars together) in one decoded value."""
MAX_DEPTH = 100
"""Deepest nesting of containers."""
_BIG_INT_BITS = 13_000  # below the interpreter's 4,300-digit limit on int <-> decimal str conversions


class NotPlain(ValueError):
    """A value that cannot cross: cyclic, too large or too deep, or bytes that do not decode to plain data."""


class Opaque:
    """Stands for a value that is not plain data (see the module docstring): truthy or not, equal only to itself."""

    __slots__ = ("type_name", "_truth")

    def __init__(self, type_name: str, truth: bool):
        self.type_name = type_name
        self._truth = truth

    def __bool__(self) -> bool:
        return self._truth

    def __repr__(self) -> str:
        return f"<{self.type_name} returned by the solution: not plain data>"


# -------------------------------------------------------------------------------------------------------- encoding


def encode(value: Any, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> bytes:
    """``value`` as wire bytes. Raises :class:`NotPlain` for a cyclic, too deep or too large value."""
    budget = [max_nodes]
    tree = _enc(value, 0, max_depth, budget, set())
    try:
        data = json.dumps(tree, separators=(",", ":")).encode("ascii")
    except (ValueError, TypeError, RecursionError) as e:
        raise NotPlain(f"cannot encode: {e}") from None
    if len(data) > MAX_BYTES:
        raise NotPlain(f"{len(data):,} bytes encoded, more than {MAX_BYTES:,}")
    return data


def _enc(v: Any, depth: int, max_depth: int, budget: list[int], path: set[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise NotPlain("more than the allowed number of values (a huge structure)")
    t = type(v)
    if v is None or t is bool or t is str or t is float:
        return v
    if t is int:
        return v if v.bit_length() <= _BIG_INT_BITS else {"i": format(v, "x")}
    if depth >= max_depth:
        raise NotPlain(f"nested deeper than {max_depth}")
    if isinstance(v, list | tuple | set | frozenset | dict):
        if id(v) in path:
            raise NotPlain(f"a cyclic {t.__name__}")
        path.add(id(v))
        try:
            return _enc_container(v, depth + 1, max_depth, budget, path)
        finally:
            path.discard(id(v))
    if isinstance(v, bool | int):
        return int.__int__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, bytes):
        return {"b": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, bytearray):
        return {"y": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    if t is range:
        return {"r": [v.start, v.stop, v.step]}
    return {"o": [getattr(t, "__qualname__", "object")[:100], bool(v)]}


def _enc_container(v: Any, depth: int, max_depth: int, budget: list[int], path: set[int]) -> Any:
    def items(it):
        return [_enc(x, depth, max_depth, budget, path) for x in it]

    if isinstance(v, list):
        return items(list.__iter__(v))
    if isinstance(v, tuple):
        return {"t": items(tuple.__iter__(v))}
    if isinstance(v, frozenset):
        return {"f": items(frozenset.__iter__(v))}
    if isinstance(v, set):
        return {"s": items(set.__iter__(v))}
    return {"d": [[_enc(k, depth, max_depth, budget, path), _enc(x, depth, max_depth, budget, path)]
                  for k, x in dict.items(v)]}


# -------------------------------------------------------------------------------------------------------- decoding


def decode(data: bytes, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """Wire bytes -> a plain value built here, of exact builtin types. Raises :class:`NotPlain` for anything else."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_BYTES:
        raise NotPlain(f"not a plain value: {type(data).__name__} of {len(data) if hasattr(data, '__len__') else '?'}"
                       " bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise NotPlain(f"not plain data: {type(e).__name__}: {str(e)[:200]}") from None
    return _dec(raw, 0, max_depth, [max_nodes])


def _dec(x: Any, depth: int, max_depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise NotPlain("more than the allowed number of values (a huge structure)")
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if depth >= max_depth:
        raise NotPlain(f"nested deeper than {max_depth}")
    if t is list:
        return [_dec(i, depth + 1, max_depth, budget) for i in x]
    if t is not dict or len(x) != 1:
        raise NotPlain(f"not plain data: a JSON {t.__name__} that names no type")
    ((tag, body),) = x.items()
    try:
        return _dec_tagged(tag, body, depth + 1, max_depth, budget)
    except NotPlain:
        raise
    except (TypeError, ValueError, OverflowError, binascii.Error) as e:  # unhashable keys, bad base64, step 0, ...
        raise NotPlain(f"not plain data ({tag!r}): {type(e).__name__}: {str(e)[:200]}") from None


def _dec_tagged(tag: str, body: Any, depth: int, max_depth: int, budget: list[int]) -> Any:
    def seq() -> list:
        if type(body) is not list:
            raise NotPlain(f"{tag!r} needs a list")
        return [_dec(i, depth, max_depth, budget) for i in body]

    if tag == "t":
        return tuple(seq())
    if tag == "s":
        return set(seq())
    if tag == "f":
        return frozenset(seq())
    if tag == "d":
        pairs = seq()
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise NotPlain("'d' needs [key, value] pairs")
        return {k: v for k, v in pairs}
    if tag in ("b", "y"):
        if type(body) is not str:
            raise NotPlain(f"{tag!r} needs base64 text")
        raw = base64.b64decode(body.encode("ascii"), validate=True)
        return raw if tag == "b" else bytearray(raw)
    if tag == "c":
        re_im = seq()
        if len(re_im) != 2 or not all(type(p) in (int, float) for p in re_im):
            raise NotPlain("'c' needs [real, imag]")
        return complex(re_im[0], re_im[1])
    if tag == "r":
        args = seq()
        if len(args) != 3 or not all(type(a) is int for a in args):
            raise NotPlain("'r' needs [start, stop, step]")
        return range(*args)
    if tag == "i":
        if type(body) is not str or len(body) > MAX_BYTES // 8:
            raise NotPlain("'i' needs hex text")
        return int(body, 16)
    if tag == "o":
        if type(body) is not list or len(body) != 2 or type(body[0]) is not str or type(body[1]) is not bool:
            raise NotPlain("'o' needs [type name, truth]")
        return Opaque(body[0][:100], body[1])
    raise NotPlain(f"unknown type tag {str(tag)[:20]!r}")


def opaque_names(value: Any, limit: int = 8) -> list[str]:
    """The type names of the opaque values inside a decoded value (for the check's notes)."""
    found: list[str] = []
    stack = [value]
    seen = 0
    while stack and len(found) < limit and seen < 100_000:
        v = stack.pop()
        seen += 1
        t = type(v)
        if t is Opaque:
            found.append(v.type_name)
        elif t in (list, tuple, set, frozenset):
            stack.extend(v)
        elif t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
    return found
