"""Offline English text: the docstrings of the Python standard library, shipped with the package, tokenized to bytes.

Nobody here wrote that text and it is about 1.75 MB. The package ships it frozen (assets/stdlib_docs.jsonl.gz, one
record per docstring, regenerated only on purpose by tools/make_text_corpus.py), so every user and every Python
version trains on the same bytes; assets/corpus.json holds the content's sha256, checked on every load. It stands in
for the sentencepiece/WebDataset pipeline and serves the same sample schema ({"tokens": (S+1,) int64}).

Train and validation are split by module: all docstrings of a module land on the same side, and the corpus holds no
paragraph twice (see the tool), so no validation paragraph is ever trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

from ebwm_scale.errors import UserError

ASSETS = Path(__file__).parent / "assets"
CORPUS_FILE, CODE_FILE, MANIFEST_FILE = "stdlib_docs.jsonl.gz", "stdlib_code.txt.gz", "corpus.json"
DOC_SEPARATOR = PARAGRAPH_SEPARATOR = "\n\n"
MIN_DOC_CHARS = 100  # one-line docstrings carry little language


class CorpusError(UserError, RuntimeError):
    """A shipped corpus file is missing, unreadable or not the content its manifest names."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless, nothing to train."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _read_asset(name: str, assets: Path = ASSETS) -> tuple[str, str]:
    """(decompressed text, its sha256), checked against the manifest."""
    path = assets / name
    fix = "restore it from the repository (git checkout) or regenerate with tools/make_text_corpus.py"
    try:
        expected = json.loads((assets / MANIFEST_FILE).read_text())[name]["sha256"]
        content = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, KeyError, ValueError) as err:
        raise CorpusError(f"cannot read the shipped corpus {path} ({err}); {fix}") from err
    digest = hashlib.sha256(content).hexdigest()
    if digest != expected:
        raise CorpusError(f"{path} holds content sha256 {digest[:12]}, {MANIFEST_FILE} says {expected[:12]}; {fix}")
    return content.decode("utf-8"), digest


def _documents_and_digest(assets: Path) -> tuple[list[dict[str, str]], str]:
    text, digest = _read_asset(CORPUS_FILE, assets)
    return [json.loads(line) for line in text.splitlines()], digest


def corpus_documents(assets: Path = ASSETS) -> list[dict[str, str]]:
    """The shipped docstrings, [{"id": "path/of/module.py:Qual.name", "text": ...}], in path order."""
    return _documents_and_digest(assets)[0]


def document_module(doc_id: str) -> str:
    """The unit of the train/val split: the module a docstring belongs to."""
    return doc_id.split(":", 1)[0]


def stdlib_code_windows(seq_len: int, assets: Path = ASSETS) -> TokenWindows:
    """Out-of-distribution text for a model trained on the docstrings: the standard library's code with its
    docstrings removed (shipped next to the corpus), as byte windows."""
    text, _ = _read_asset(CODE_FILE, assets)
    return TokenWindows(ByteTokenizer().encode(text), seq_len)


def is_validation_document(key: str, val_percent: float) -> bool:
    """Deterministic split by a hash of `key` (a document's module, its content, a file name): the same key lands on
    the same side on every machine."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < val_percent * 100


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


def stdlib_docs_splits(
    seq_len: int, val_percent: float, assets: Path = ASSETS
) -> tuple[TokenWindows, TokenWindows, str]:
    """(train, val, sha256 of the corpus content) for the shipped docstring corpus, split by module."""
    documents, digest = _documents_and_digest(assets)
    sides: dict[bool, list[str]] = {False: [], True: []}
    for doc in documents:
        sides[is_validation_document(document_module(doc["id"]), val_percent)].append(doc["text"])
    train, val = (TokenWindows(ByteTokenizer().encode(DOC_SEPARATOR.join(sides[v])), seq_len) for v in (False, True))
    return train, val, digest
