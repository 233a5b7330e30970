"""The one shard schema, shared by the prep jobs (writers) and the loader (reader).

A dataset directory (any fsspec URL):
    meta.json              FORMAT, tokenizer, seq_len, and per split the shards with sample count, bytes, sha256
    tokenizer.model        the sentencepiece model the tokens were made with
    train/*.tar, val/*.tar WebDataset shards; each sample is {"__key__": str, "tokens.npy": int32 (seq_len + 1,)}
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

FORMAT = "ebwm-scale/text-shards/1"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENS_KEY = "tokens.npy"
SPLITS = ("train", "val")
SHARD_MTIME = 1  # fixed (integer: a float mtime costs a pax header per member) so re-runs are byte-identical


class ShardFormatError(ValueError):
    """A dataset directory or shard that does not follow this schema; the message names the URL."""


def encode_tokens(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens.astype(np.int32), allow_pickle=False)
    return buffer.getvalue()


def decode_tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shard(samples: list[tuple[str, np.ndarray]]) -> bytes:
    """A WebDataset tar (as bytes) holding (key, tokens) samples."""
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=SHARD_MTIME, format=tarfile.USTAR_FORMAT) as writer:
        for key, tokens in samples:
            writer.write({"__key__": key, TOKENS_KEY: encode_tokens(tokens)})
    return buffer.getvalue()


def read_shard(data: bytes, url: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) of every sample of a shard's bytes; raises on a truncated or malformed tar."""
    stream = ({**entry, "__url__": url} for entry in tar_file_iterator(io.BytesIO(data)))
    for sample in group_by_keys(stream):
        if TOKENS_KEY not in sample:
            raise ShardFormatError(f"sample {sample.get('__key__')!r} has no {TOKENS_KEY}")
        yield sample["__key__"], decode_tokens(sample[TOKENS_KEY])


def read_meta(url: str) -> dict[str, Any]:
    """meta.json of a dataset directory, checked for the fields every reader relies on."""
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/{META_FILE}"
    try:
        with fs.open(path) as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise ShardFormatError(f"{url} has no {META_FILE}: run `ebwm-prep text` to make a dataset there") from None
    except ValueError as error:
        raise ShardFormatError(f"{url}/{META_FILE} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT:
        raise ShardFormatError(f"{url}/{META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def is_corrupt_error(error: BaseException) -> bool:
    """Errors that mean 'this shard is damaged' (skip it) rather than 'the setup is wrong' (stop)."""
    return isinstance(error, tarfile.TarError | ShardFormatError | ValueError | EOFError | KeyError)
