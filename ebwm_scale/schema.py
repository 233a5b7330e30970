"""What the recipe sections share: typed choices, the checks of numeric fields that each section runs on itself, and
the flat `section.key` view of a recipe (MLflow params, the resume check).

A section's `problems()` returns one 'key=value why' line per rule it breaks, keys in full (`model.dim`);
ebwm_scale/config.py adds the rules that span sections.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """One allowed value of a recipe key. OmegaConf checks the value against the members when a recipe loads, and
    writes a member back by its name: subclasses name each member by its value (`ebt = "ebt"`).

    A member is its value everywhere else: it compares and hashes as the plain string, and prints as it too (f-strings,
    str(), repr() in messages), which enum.StrEnum would give but not before Python 3.11.
    """

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]  # Enum declares it as a method; str's is one too
    __repr__ = str.__repr__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def positive(section: object, prefix: str, *names: str) -> list[str]:
    """'prefix.name=value must be > 0' for each of the section's fields `names` that is not."""
    return [f"{prefix}.{name}={getattr(section, name)} must be > 0" for name in names if getattr(section, name) <= 0]


def non_negative(section: object, prefix: str, *names: str) -> list[str]:
    """'prefix.name=value must be >= 0' for each of the section's fields `names` that is not."""
    return [f"{prefix}.{name}={getattr(section, name)} must be >= 0" for name in names if getattr(section, name) < 0]


def flatten(nested: dict) -> dict[str, object]:
    """{"model": {"dim": 128}} -> {"model.dim": 128}."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", nested)
    return flat
