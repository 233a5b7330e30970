"""`ebwm-pretrain --help`: every recipe key with its type, default and meaning, read from the config dataclasses and
the comments beside (or above) their fields, so the listing cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from enum import Enum

FIELD_LINE = re.compile(r"^\s+(\w+): [^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def _comments(cls: type) -> dict[str, str]:
    """field name -> its comment: the one on its line, else the comment lines right above it."""
    meanings, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = FIELD_LINE.match(line)
        if match and not stripped.startswith(("def ", "@", "return")):
            meanings[match[1]] = match[2] or " ".join(above)
        above = []
    return meanings


def _type_name(hint: object, written: str) -> str:
    """A choice's allowed values (`ebt|ar`); any other type as the dataclass writes it."""
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "|".join(member.value for member in hint)
    return written


def recipe_keys(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every leaf field under `schema`, depth first."""
    rows = []
    meanings = _comments(schema)
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(default):
            rows += recipe_keys(type(default), f"{key}.")
        else:
            kind = _type_name(hints[field.name], str(field.type))
            rows.append((key, kind, repr(default), meanings.get(field.name, "")))
    return rows


def help_text(schema: type, usage: str) -> str:
    rows = recipe_keys(schema)
    width = max(len(key) for key, *_ in rows)
    lines = [usage, "", "Recipe keys (YAML sections, or key.sub=value on the command line):"]
    section = ""
    for key, kind, default, meaning in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"\n{section}:")
        first_sentence = meaning.split(". ")[0].rstrip(".")
        lines.append(f"  {key:<{width}}  {kind} = {default}" + (f"  # {first_sentence}" if meaning else ""))
    return "\n".join(lines)
