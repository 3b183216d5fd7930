"""A small reader for protobuf text format (Caffe ``.prototxt``, TensorFlow ``.pbtxt``).

Text format names fields, so no schema is needed: every field becomes a list
in a :class:`~kiln.viewer.formats._protobuf.Message`.  Scalars are kept as
Python ``int``/``float``/``str`` (enum names and ``true``/``false`` stay words;
callers interpret them).  The tokenizer is linear and nesting is bounded.
"""
from __future__ import annotations

import re

from kiln.viewer.formats._protobuf import Message

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|
    (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|
    (?P<num>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)|
    (?P<word>[-+]?[A-Za-z_][A-Za-z0-9_.]*(?:/[A-Za-z0-9_.]+)*)|
    (?P<punct>[{}\[\]<>:,;])""",
    re.VERBOSE,
)
_MAX_DEPTH = 100


class TextFormatError(ValueError):
    """The text does not follow protobuf text format."""


def _unescape(s: str) -> str:
    body = s[1:-1]
    if "\\" not in body:
        return body
    try:
        return body.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return body


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            line = text.count("\n", 0, pos) + 1
            raise TextFormatError(f"unexpected character {text[pos]!r} on line {line}")
        pos = m.end()
        kind = m.lastgroup
        if kind:
            tokens.append((kind, m.group(kind)))
    return tokens


def _number(tok: str) -> int | float:
    t = tok.rstrip("fF") if not tok.lower().startswith(("0x", "-0x", "+0x")) else tok
    try:
        return int(t, 0)
    except ValueError:
        return float(t)


def parse(text: str) -> Message:
    """Parse a whole text-format message."""
    tokens = tokenize(text)
    msg, pos = _message(tokens, 0, None, 0)
    return msg


def _message(tokens: list[tuple[str, str]], pos: int, close: str | None, depth: int) -> tuple[Message, int]:
    if depth > _MAX_DEPTH:
        raise TextFormatError("messages nested too deeply")
    msg = Message()
    n = len(tokens)
    while pos < n:
        kind, tok = tokens[pos]
        if close is not None and tok == close and kind == "punct":
            return msg, pos + 1
        if tok in (",", ";"):
            pos += 1
            continue
        if kind != "word" and not (kind == "punct" and tok == "["):
            raise TextFormatError(f"expected a field name, found {tok!r}")
        if tok == "[":   # extension or Any type URL: [name] { ... }
            end = pos
            while end < n and tokens[end][1] != "]":
                end += 1
            name = "".join(t for _, t in tokens[pos:end + 1])
            pos = end + 1
        else:
            name = tok
            pos += 1
        if pos < n and tokens[pos][1] == ":":
            pos += 1
        if pos >= n:
            raise TextFormatError(f"field {name!r} has no value")
        kind, tok = tokens[pos]
        values = msg.setdefault(name, [])
        if tok in ("{", "<"):
            sub, pos = _message(tokens, pos + 1, "}" if tok == "{" else ">", depth + 1)
            values.append(sub)
        elif tok == "[":
            pos += 1
            while pos < n and tokens[pos][1] != "]":
                if tokens[pos][1] == ",":
                    pos += 1
                    continue
                if tokens[pos][1] in ("{", "<"):
                    sub, pos = _message(tokens, pos + 1, "}" if tokens[pos][1] == "{" else ">", depth + 1)
                    values.append(sub)
                else:
                    values.append(_scalar(tokens[pos]))
                    pos += 1
            pos += 1
        else:
            value = _scalar((kind, tok))
            pos += 1
            while isinstance(value, str) and kind == "str" and pos < n and tokens[pos][0] == "str":
                value += _unescape(tokens[pos][1])   # adjacent strings concatenate
                pos += 1
            values.append(value)
    if close is not None:
        raise TextFormatError(f"missing {close!r} at the end of the text")
    return msg, pos


def _scalar(token: tuple[str, str]) -> int | float | str:
    kind, tok = token
    if kind == "str":
        return _unescape(tok)
    if kind == "num":
        return _number(tok)
    if kind == "word":
        low = tok.lower()
        if low in ("inf", "infinity", "+inf"):
            return float("inf")
        if low in ("-inf", "-infinity"):
            return float("-inf")
        if low == "nan":
            return float("nan")
        return tok
    raise TextFormatError(f"unexpected {tok!r}")
