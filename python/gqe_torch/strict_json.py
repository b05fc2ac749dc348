"""JSON read as gqe's C++ reader reads it, so that a file one side refuses the other refuses too."""

import json
import math

from .errors import BadInput


def _unique_object(pairs):
    """object_pairs_hook that refuses a key given twice (plain json keeps the last one)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise BadInput(f"the key {key!r} is given twice")
        out[key] = value
    return out


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is beyond a double's range")
    return value


def _refuse_lone_surrogates(value):
    """A \\uD800-\\uDFFF escape without its pair is no character: json keeps it, gqe refuses it.
    (Pairs are joined into one character by json, so any surrogate left is a lone one.)"""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"the string {v[:40]!r} holds a lone surrogate escape, which is no character") from None


def loads(text):
    """json.loads, strict: a key given twice raises BadInput; NaN, Infinity, a number beyond a
    double's range, a lone surrogate escape and nesting deeper than Python's recursion allows raise
    ValueError."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    _refuse_lone_surrogates(value)
    return value
