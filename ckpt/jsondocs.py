"""A document of the format parsed from storage's bytes: any JSON document, refused with a
:class:`FormatError` that says the checkpoint is corrupt, and a writer's fragment, whose array
declarations are parsed only when they differ from the last fragment's.

Imports nothing of the package but :mod:`ckpt.errors`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .errors import FormatError


def loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON ({e}); the checkpoint is corrupt") from None


# A fragment as our writer lays it out: the array declarations are its seventh member.
_FRAGMENT_HEAD = re.compile(r'\{"format":"ckpt","format_version":\d{1,3},"step":\d{1,20},"save_id":"[^"\\]*",'
                            r'"writer":"[^"\\]*","created_at":[-+.0-9eE]{1,40},"arrays":')
_DECODER = json.JSONDecoder()
_STAND_IN = f'"{uuid.uuid4().hex}"'  # the declarations' place while the rest is parsed: no file holds it
# The declarations of the last fragment parsed: (their JSON text, the parsed list, shared, never mutated)
_known_arrays: tuple[str, list] | None = None


def loads_fragment(data: bytes, path: str) -> Any:
    """A fragment's JSON, its array declarations parsed only when they differ from the last
    fragment's: every writer of an FSDP job declares the same arrays, so a committer reading N
    fragments compares N copies of them as text (a JSON value's text delimits itself) and parses
    one. Anything not laid out as our writer lays it out is parsed whole."""
    global _known_arrays
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return loads(data, path)
    m = _FRAGMENT_HEAD.match(text)
    if m is None:
        return loads(data, path)
    pos, known = m.end(), _known_arrays
    if known is not None and text.startswith(known[0], pos):
        arrays, end = known[1], pos + len(known[0])
    else:
        try:
            arrays, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return loads(data, path)
        if type(arrays) is not list:
            return loads(data, path)
        _known_arrays = (text[pos:end], arrays)
    try:
        doc = json.loads(text[:pos] + _STAND_IN + text[end:])
    except json.JSONDecodeError:
        return loads(data, path)
    if type(doc) is not dict or doc.get("arrays") != _STAND_IN[1:-1]:  # a later "arrays" member: as json reads it
        return loads(data, path)
    doc["arrays"] = arrays
    return doc


def loads_around(parts: list[bytes]) -> tuple[Any, str] | None:
    """The JSON document of ``parts`` joined by a stand-in string (in place of spans of a
    document the caller compared as text, or does not need, rather than parsed), and the
    stand-in, which the caller finds where it expects the spans (then they were those
    values); None if not JSON."""
    try:
        return json.loads(_STAND_IN.encode().join(parts)), _STAND_IN[1:-1]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
