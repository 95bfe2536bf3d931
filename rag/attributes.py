"""Attributes on vector-store files and the filters that select files by them (OpenAI's shapes).

Attributes: at most 16 keys, keys up to 64 characters, values a string (up to 512 characters),
a number or a boolean. Filters are OpenAI's:
    {"type": "eq" | "ne" | "gt" | "gte" | "lt" | "lte" | "in" | "nin", "key": str, "value": ...}
    {"type": "and" | "or", "filters": [filter, ...]}
A comparison on a key the file does not have is false (so `ne` and `nin` need the key too).
Ordering comparisons between a number and a string are false, never an error.
"""
from typing import Any

MAX_KEYS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512
COMPARISONS = {"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"}
COMPOUNDS = {"and", "or"}
MAX_FILTER_DEPTH = 16

Attributes = dict[str, str | int | float | bool]


def validate_attributes(attributes: Any, param: str = "attributes") -> Attributes:
    """The attributes, or ValueError naming the field and the limit."""
    if attributes is None:
        return {}
    if not isinstance(attributes, dict):
        raise ValueError(f"{param}: must be an object of key-value pairs")
    if len(attributes) > MAX_KEYS:
        raise ValueError(f"{param}: at most {MAX_KEYS} keys, got {len(attributes)}")
    for key, value in attributes.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise ValueError(f"{param}: keys must be 1-{MAX_KEY_CHARS} characters, got {str(key)[:80]!r}")
        if isinstance(value, str):
            if len(value) > MAX_VALUE_CHARS:
                raise ValueError(f"{param}.{key}: string values are at most {MAX_VALUE_CHARS} characters")
        elif not isinstance(value, (bool, int, float)):
            raise ValueError(f"{param}.{key}: values must be a string, a number or a boolean")
    return dict(attributes)


def validate_filter(f: Any, param: str = "filters", depth: int = 0) -> dict:
    """The filter as given, or ValueError naming the bad part (the caller answers 400)."""
    if depth > MAX_FILTER_DEPTH:
        raise ValueError(f"{param}: nested deeper than {MAX_FILTER_DEPTH}")
    if not isinstance(f, dict):
        raise ValueError(f"{param}: must be an object")
    kind = f.get("type")
    if kind in COMPOUNDS:
        subs = f.get("filters")
        if not isinstance(subs, list) or not subs:
            raise ValueError(f"{param}.filters: a compound filter needs a non-empty list of filters")
        for i, sub in enumerate(subs):
            validate_filter(sub, f"{param}.filters[{i}]", depth + 1)
        return f
    if kind not in COMPARISONS:
        raise ValueError(f"{param}.type: must be one of {', '.join(sorted(COMPARISONS | COMPOUNDS))}, got {kind!r}")
    if not isinstance(f.get("key"), str):
        raise ValueError(f"{param}.key: a comparison filter needs a string key")
    if "value" not in f:
        raise ValueError(f"{param}.value: a comparison filter needs a value")
    value = f["value"]
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
            raise ValueError(f"{param}.value: `{kind}` needs a list of strings or numbers")
    elif not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{param}.value: must be a string, a number or a boolean")
    return f


def matches(f: dict, attributes: Attributes) -> bool:
    """Whether attributes pass a validated filter."""
    kind = f["type"]
    if kind == "and":
        return all(matches(sub, attributes) for sub in f["filters"])
    if kind == "or":
        return any(matches(sub, attributes) for sub in f["filters"])
    if f["key"] not in attributes:
        return False
    have, want = attributes[f["key"]], f["value"]
    if kind == "eq":
        return same_kind(have, want) and have == want
    if kind == "ne":
        return not (same_kind(have, want) and have == want)
    if kind == "in":
        return any(same_kind(have, w) and have == w for w in want)
    if kind == "nin":
        return not any(same_kind(have, w) and have == w for w in want)
    if not same_kind(have, want) or isinstance(have, bool):
        return False
    return {"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}[kind]


def same_kind(a: Any, b: Any) -> bool:
    """Strings compare with strings, booleans with booleans, numbers with numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return True
