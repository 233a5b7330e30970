"""The shard schema, shared by the prep jobs (writers) and the loader (reader).

A dataset directory (any fsspec URL):
    meta.json              format, per split the shards with sample count, bytes, sha256, and what the samples are:
                           text: tokenizer, seq_len; video: frame encoder, clip frames, latent dim and statistics
    tokenizer.model        text: the sentencepiece model the tokens were made with
    train/*.tar, val/*.tar WebDataset shards. Text: one member per shard, {"__key__": str, "tokens.npy": (N, seq_len
                           + 1)} of every sample's tokens, uint16 for vocabularies up to 65,536 (else uint32): 2 bytes
                           a token plus ~2 KB per shard. Text format 1 (still read) held one int32 member per sample,
                           8x that. Video: one member per sample, {"__key__": str, "latents.npy": float16 (T, D)}
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ebwm_scale.errors import UserError

TEXT_FORMAT = "ebwm-scale/text-shards/2"
TEXT_FORMAT_PER_SAMPLE = "ebwm-scale/text-shards/1"  # the first format: one int32 member per sample
VIDEO_FORMAT = "ebwm-scale/video-shards/1"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENS_KEY = "tokens.npy"
LATENTS_KEY = "latents.npy"
SPLITS = ("train", "val")
SHARD_MTIME = 1  # fixed (integer: a float mtime costs a pax header per member) so re-runs are byte-identical


class ShardFormatError(UserError, ValueError):
    """A dataset directory or shard that does not follow this schema; the message names the URL."""


class ReadError(UserError, OSError):
    """A read that failed on every attempt (not a damaged file: the storage did not answer); names the URL."""


T = TypeVar("T")


def retrying(action: Callable[[], T], url: str, attempts: int, backoff_s: float) -> T:
    """action(), tried `attempts` times in all while it raises OSError (a network blip on an object store), waiting
    backoff_s, 2 x backoff_s, ... in between; then ReadError naming `url`."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except OSError as error:
            if attempt == attempts:
                raise ReadError(f"cannot read {url} ({attempts} attempts): {error}") from error
            wait = backoff_s * 2 ** (attempt - 1)
            warnings.warn(
                f"reading {url} failed ({error}); retry {attempt} in {wait:g} s", RuntimeWarning, stacklevel=3
            )
            time.sleep(wait)
    raise ValueError(f"attempts={attempts} must be >= 1")


def read_bytes(url: str, attempts: int, backoff_s: float) -> bytes:
    """The whole file at `url`, with `retrying`."""

    def read() -> bytes:
        with fsspec.open(url, "rb") as f:
            return f.read()

    return retrying(read, url, attempts, backoff_s)


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(samples: list[tuple[str, np.ndarray]], field: str = TOKENS_KEY) -> bytes:
    """A WebDataset tar (as bytes) holding (key, array) members under `field`, arrays stored as they are."""
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=SHARD_MTIME, format=tarfile.USTAR_FORMAT) as writer:
        for key, array in samples:
            writer.write({"__key__": key, field: encode_array(array)})
    return buffer.getvalue()


def read_shard(data: bytes, url: str = "", field: str = TOKENS_KEY) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of every sample of a shard's bytes; raises on a truncated or malformed tar."""
    stream = ({**entry, "__url__": url} for entry in tar_file_iterator(io.BytesIO(data)))
    for sample in group_by_keys(stream):
        if field not in sample:
            raise ShardFormatError(f"sample {sample.get('__key__')!r} has no {field}")
        yield sample["__key__"], decode_array(sample[field])


def read_meta(url: str) -> dict[str, Any]:
    """meta.json of a dataset directory, checked for the fields every reader relies on."""
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/{META_FILE}"
    try:
        with fs.open(path) as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise ShardFormatError(f"{url} has no {META_FILE}: make a dataset there with `ebwm-prep text|video`") from None
    except ValueError as error:
        raise ShardFormatError(f"{url}/{META_FILE} is not valid JSON: {error}") from None
    known = (TEXT_FORMAT, TEXT_FORMAT_PER_SAMPLE, VIDEO_FORMAT)
    if meta.get("format") not in known:
        raise ShardFormatError(f"{url}/{META_FILE} has format {meta.get('format')!r}, expected one of {known}")
    return meta


def sample_field(meta: dict[str, Any]) -> str:
    return LATENTS_KEY if meta["format"] == VIDEO_FORMAT else TOKENS_KEY


def shard_samples(meta: dict[str, Any], members: list[np.ndarray]) -> list[np.ndarray]:
    """A shard's samples from its members' arrays: the rows of a text shard's one array, else one per member."""
    if meta["format"] != TEXT_FORMAT:
        return members
    if any(array.ndim != 2 for array in members):
        raise ShardFormatError(f"a text shard member is not a (samples, tokens) array: {[a.shape for a in members]}")
    return [row for array in members for row in array]


def is_corrupt_error(error: BaseException) -> bool:
    """Errors that mean 'this shard is damaged' (skip it) rather than 'the setup is wrong' (stop)."""
    return isinstance(error, tarfile.TarError | ShardFormatError | ValueError | EOFError | KeyError)
