"""Method specs: ``name[k=v,...]`` parsed to typed overrides and written back exactly.

:func:`parse_spec` and :func:`format_spec` are inverses for every value a Config holds, so a
method's :meth:`~methods.base.Method.identity` reads back as the very same config. Values are
YAML scalars, read with :func:`strict_yaml_load` (safe tags only, no aliases, no duplicate
keys), which run configs use too.
"""

from __future__ import annotations

import functools
import logging
import numbers
import re
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[(.*)\])?\s*$")
#: Longest spec text echoed in an error message.
_SHOW_LIMIT = 200


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to :data:`_SHOW_LIMIT` characters for error messages."""
    shown = repr(value)
    if len(shown) <= _SHOW_LIMIT:
        return shown
    return f"{shown[:_SHOW_LIMIT]}... ({len(shown)} characters)"


def strict_yaml_load(text: str) -> Any:
    """Parse one YAML document with :func:`strict_yaml_loader` (safe tags only).

    Raises:
        yaml.YAMLError: invalid YAML, an alias or anchor, a duplicate key, a Python tag.
    """
    loader = strict_yaml_loader()(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.cache
def strict_yaml_loader() -> type:
    """A ``yaml.SafeLoader`` subclass that refuses aliases, anchors and duplicate keys.

    Aliases let a few lines expand into gigabytes (a "billion laughs" document) and nothing in
    a run config or a method spec needs them; a key given twice would silently keep only its
    last value. Both raise ``yaml.YAMLError`` naming the line.
    """
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are not allowed "
                    f"(line {event.start_mark.line + 1})",
                    event.start_mark,
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {short_repr(key)} is given twice "
                        f"(line {key_node.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictSafeLoader


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name[k=v,...]`` into the name and typed overrides (YAML scalars).

    Raises:
        ValueError: an unparsable spec, a part that is not ``k=v``, a key given twice.
        yaml.YAMLError: a value that is not plain YAML (tags, anchors, aliases).
    """
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(
            f"cannot parse method spec {short_repr(spec)}; expected name or name[k=v,...]"
        )
    name, inner = m.group(1), m.group(2)
    overrides: dict[str, Any] = {}
    if inner:
        for part in split_top_level(inner):
            if "=" not in part:
                raise ValueError(f"method spec {short_repr(spec)}: {short_repr(part)} is not k=v")
            key, raw = (t.strip() for t in part.split("=", 1))
            if key in overrides:
                raise ValueError(
                    f"method spec {short_repr(spec)}: parameter {key!r} is given twice"
                )
            value = _scalar(raw)
            if isinstance(value, list):
                value = tuple(value)
            overrides[key] = value
    return name, overrides


def _scalar(raw: str) -> Any:
    """One spec value, typed.

    ``None``; ``(a,b)`` or ``[a,b]`` as a tuple of values read one by one; then numbers (YAML
    1.1 reads ``5e-4`` as a string); then YAML (booleans, ``null``, quoted strings, words).
    """
    if raw == "None":
        return None
    if len(raw) >= 2 and raw[0] + raw[-1] in ("()", "[]"):
        return tuple(_scalar(part) for part in split_top_level(raw[1:-1]))
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return strict_yaml_load(raw)


#: Characters after which a quote opens a quoted value (``k="a,b"``, ``("x",'y')``).
_QUOTE_AFTER = ("", "=", ",", "(", "[", "{")


def split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets and quotes; parts stripped, empty ones dropped.

    Splits both a list of specs (``a,b[k=1,j=(2,3)],c``) and a spec's ``k=v`` parts. A quote
    opens a quoted value only at the start of a value (after ``=``, ``,`` or a bracket), so an
    apostrophe inside a word (a file name) is an ordinary character.
    """
    parts: list[str] = []
    cur: list[str] = []
    depth, quote, escaped, prev = 0, "", False, ""
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'" and (prev in _QUOTE_AFTER or prev + ch == "''"):
            quote = ch  # ``''`` inside single quotes is YAML's escaped quote
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur, prev = [], ","
            continue
        cur.append(ch)
        if not ch.isspace():
            prev = ch
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def format_spec(name: str, params: Mapping[str, Any]) -> str:
    """``name[k=v,...]`` (keys sorted), or ``name`` alone: the inverse of :func:`parse_spec`.

    ``parse_spec(format_spec(name, params)) == (name, params)`` for every value a Config
    holds: ints, floats, bools, strings, ``None`` and tuples of them. A float is written with
    ``{:g}`` where that text is exact (``0.001``, ``1e-05``, ``1``: method ids unchanged) and
    as ``repr``, the shortest exact text, where ``{:g}`` would lose digits (``0.000123456789``,
    not ``0.000123457``); an integral float reads back as an equal int. A string is written
    bare unless it would read back as something else (``true``, ``1``, ``None``) or holds spec
    syntax (commas, brackets, quotes), then double-quoted with YAML escapes.
    """
    if not params:
        return name
    inner = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(params.items()))
    return f"{name}[{inner}]"


def _format_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        short = f"{number:g}"
        return short if float(short) == number else repr(number)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_format_value(v) for v in value) + ")"
    text = str(value)  # a str, or a Path
    return text if _is_bare(text) else _quote(text)


def _is_bare(text: str) -> bool:
    """Whether ``text`` reads back as itself without quotes."""
    if not text or text != text.strip() or any(ch in ",()[]{}'\"\\" for ch in text):
        return False
    try:
        value = _scalar(text)
    except Exception:  # noqa: BLE001 - not plain YAML (``@x``, ``*x``, ``!x``): quote it
        return False
    return isinstance(value, str) and value == text


def _quote(text: str) -> str:
    """``text`` as a YAML double-quoted scalar; characters that are not printable escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'
