"""Optional dependencies, named by the pip extra that installs them, so that a missing one is a one-line message
(`... needs deepspeed: pip install 'ebwm-scale[cluster]'`) instead of a ModuleNotFoundError deep in a run."""

from __future__ import annotations

import importlib.util

import fsspec

PROTOCOL_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def missing(*modules: str) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module) is None]


def needs(what: str, extra: str, *modules: str) -> str | None:
    """A one-line problem if any of `modules` is not installed, else None."""
    absent = missing(*modules)
    if not absent:
        return None
    return f"{what} needs {', '.join(absent)}: pip install 'ebwm-scale[{extra}]'"


def url_needs(key: str, url: str) -> str | None:
    """The problem with an object-store URL whose fsspec filesystem is not installed (s3fs, gcsfs), else None."""
    protocol = fsspec.utils.get_protocol(url) if url else "file"
    if protocol not in PROTOCOL_EXTRAS:
        return None
    module, extra = PROTOCOL_EXTRAS[protocol]
    return needs(f"{key}={url}", extra, module)
