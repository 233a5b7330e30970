"""Offline English text: the docstrings of the Python standard library, tokenized to bytes.

Nobody here wrote that text, every Python install has it, and it is several MB. It stands in for the
sentencepiece/WebDataset pipeline until that lands; it serves the same sample schema ({"tokens": (S+1,) int64}).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

import numpy as np

DOC_SEPARATOR = "\n\n"
MIN_DOC_CHARS = 100  # one-line docstrings carry little language


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless, nothing to train."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a few stdlib files are test fixtures with deliberate errors
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    docs = (ast.get_docstring(node) for node in nodes)
    return [doc for doc in docs if doc and len(doc) >= MIN_DOC_CHARS]


def extract_stdlib_documents() -> list[str]:
    """Every long docstring of the standard library's own modules (no tests, no site-packages), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    documents = []
    for path in sorted(root.rglob("*.py")):
        if skipped_dirs.intersection(path.relative_to(root).parts):
            continue
        documents.extend(_docstrings(path))
    return documents


def _code_without_docstrings(path: Path) -> str:
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return ""
    dropped = set()
    for node in [tree, *ast.walk(tree)]:
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                dropped.update(range(body[0].lineno, body[0].end_lineno + 1))
    return "\n".join(line for number, line in enumerate(source.splitlines(), 1) if number not in dropped)


def stdlib_code_windows(seq_len: int, max_bytes: int = 1 << 20) -> TokenWindows:
    """Out-of-distribution text for a model trained on docstrings: the standard library's code itself, docstrings
    removed, as byte windows (the first `max_bytes`, modules in path order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            code = _code_without_docstrings(path)
        except UnicodeDecodeError:
            continue
        pieces.append(code)
        size += len(code)
        if size >= max_bytes:
            break
    return TokenWindows(ByteTokenizer().encode(DOC_SEPARATOR.join(pieces)[:max_bytes]), seq_len)


def _cached_corpus(cache_dir: Path) -> str:
    """The joined corpus, extracted once per Python version and cached (written atomically)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = cache_dir / f"stdlib_docs-py{version}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = DOC_SEPARATOR.join(extract_stdlib_documents())
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cache_dir, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
    return text


def is_validation_document(doc: str, val_percent: float) -> bool:
    """Deterministic split by content hash: the same document lands on the same side on every machine."""
    return zlib.crc32(doc.encode("utf-8")) % 10_000 < val_percent * 100


class TokenWindows:
    """Non-overlapping windows of S+1 tokens cut from one token stream (documents packed, separated)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.window = seq_len + 1
        if len(tokens) < self.window:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one sample of {self.window}")

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self.window
        return {"tokens": self.tokens[start : start + self.window].astype(np.int64)}


def stdlib_docs_splits(seq_len: int, val_percent: float, cache_dir: str) -> tuple[TokenWindows, TokenWindows, str]:
    """(train, val, sha256 of the corpus) for the stdlib docstring corpus."""
    text = _cached_corpus(Path(cache_dir).expanduser())
    documents = text.split(DOC_SEPARATOR)
    tokenizer = ByteTokenizer()
    splits = {}
    for is_val in (False, True):
        chosen = [doc for doc in documents if is_validation_document(doc, val_percent) == is_val]
        splits[is_val] = TokenWindows(tokenizer.encode(DOC_SEPARATOR.join(chosen)), seq_len)
    return splits[False], splits[True], hashlib.sha256(text.encode("utf-8")).hexdigest()
