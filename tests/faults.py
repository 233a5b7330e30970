"""A filesystem that fails like a network store: shared by the loader and prep tests."""

from collections import Counter

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Flaky(LocalFileSystem):
    """`flaky:///dir`: local files whose first `failures` opens (per file ending in one of `suffixes`) raise a
    connection reset, as a read from an object store sometimes does."""

    protocol = ("flaky",)
    failures = 0
    suffixes: tuple[str, ...] = ()
    failed: Counter = Counter()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        if path.endswith(self.suffixes) and self.failed[path] < self.failures:
            self.failed[path] += 1
            raise ConnectionResetError(104, "Connection reset by peer", path)
        return super()._open(path, mode, **kwargs)


def flaky_store(failures: int, *suffixes: str) -> type[Flaky]:
    """Register `flaky://` with a fresh failure count and return the class (its `failed` counts the failures)."""
    fsspec.register_implementation("flaky", Flaky, clobber=True)
    Flaky.failures, Flaky.suffixes, Flaky.failed = failures, suffixes, Counter()
    return Flaky
