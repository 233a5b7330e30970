"""Text -> sentencepiece tokens -> fixed-length samples in WebDataset shards, in parallel with Ray.

    ebwm-prep text --input 'corpus/*.jsonl' --output shards/ --vocab-size 2048 --seq-len 256
    python -m data_prep.text ...                                   (same arguments)
    ray submit cluster/ray/cluster.yaml data_prep/text.py -- ...  (on a Ray cluster)

Inputs are fsspec URLs or globs of plain text (one document per file), JSONL (one document per line, --text-field)
or parquet (a text column). Text and JSONL may be compressed (.gz, .zst, .bz2, .xz): such a file is read whole as
one chunk, where uncompressed JSONL is split into byte ranges. The job (1) splits the inputs into chunks, (2) trains
a sentencepiece model on a hash-selected sample of documents, or reuses --tokenizer, (3) runs one Ray task per chunk
that tokenizes and writes that chunk's shards (tokens as uint16 up to 65,536 ids), each under a temp name then
renamed, and finally a chunk marker, (4) writes meta.json from the markers. A re-run after a kill skips the chunks
that have markers and rewrites the others byte for byte, so the final set has no duplicate and no missing sample.
Documents go to train or val by a hash of their text. Malformed JSONL lines are counted and the first ones named in
meta.json; inputs that yield no document are an error.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np

from data_prep.common import (
    bounded,
    init_ray,
    list_inputs,
    merge_counts,
    open_output,
    run_chunks,
    split_entries,
    write_atomic,
    write_marker,
    write_split_shards,
)
from ebwm_scale.data.shards import META_FILE, SPLITS, TEXT_FORMAT, TOKENIZER_FILE, TOKENS_KEY, token_dtype
from ebwm_scale.data.text import is_validation_document
from ebwm_scale.extras import needs

BAD_EXAMPLES = 20  # how many malformed JSONL lines (url:line) and undecodable documents meta.json names


@dataclass(kw_only=True)
class TextPrepConfig:
    inputs: list[str]
    output: str
    input_format: str = "auto"  # auto (by extension) | text | jsonl | parquet
    text_field: str = "text"
    tokenizer: str = ""  # an existing sentencepiece .model to reuse; empty: train one
    vocab_size: int = 2048
    model_type: str = "bpe"  # bpe | unigram
    tokenizer_sample_mb: float = 64.0
    # sentencepiece's trainer threads. A fixed number, not the machine's cores: the model it trains depends on it.
    tokenizer_threads: int = 16
    seed: int = 0
    seq_len: int = 256  # samples hold seq_len + 1 tokens
    mode: str = "pack"  # pack: documents joined by EOS and cut into windows | truncate: one window per document
    shard_mb: float = 64.0
    chunk_mb: float = 32.0
    val_percent: float = 1.0
    max_bad_fraction: float = 0.001  # malformed lines + undecodable files above this share of records stop the job
    num_cpus: int = 0  # local Ray: 0 = all cores
    ray_address: str = ""  # "": connect to $RAY_ADDRESS if set, else start Ray on this machine; "auto": running cluster
    max_in_flight: int = 0  # tasks submitted at once; 0 = 2 x cluster CPUs

    def settings(self) -> dict:
        """What determines the output bytes: a re-run into the same directory must agree on all of it."""
        keep = (
            "inputs",
            "input_format",
            "text_field",
            "vocab_size",
            "model_type",
            "tokenizer_sample_mb",
            "tokenizer_threads",
            "seed",
            "seq_len",
            "mode",
            "shard_mb",
            "chunk_mb",
            "val_percent",
        )
        return {"format": TEXT_FORMAT} | {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class Piece:
    url: str
    start: int  # bytes for text/jsonl; row group for parquet
    end: int


@dataclass(frozen=True)
class Chunk:
    index: int
    input_format: str
    pieces: tuple[Piece, ...]


def _compression(url: str) -> str | None:
    """fsspec's codec for the file's extension (gzip, zstd, bz2, lzma, ...), or None."""
    codec = fsspec.utils.infer_compression(url)
    if codec is None and url.lower().endswith(".zst"):  # fsspec knows zstd only once zstandard is installed
        raise SystemExit(needs(f"reading {url}", "prep", "zstandard") or f"fsspec cannot decompress {url}")
    return codec


def _format_of(url: str, requested: str) -> str:
    if requested != "auto":
        return requested
    name = url.lower()
    if _compression(url):
        name = name.rsplit(".", 1)[0]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def make_chunks(files: list[tuple[str, int]], requested_format: str, chunk_bytes: int) -> list[Chunk]:
    """Text files group whole (one document each); JSONL files split into line-aligned byte ranges; parquet files
    split by row group."""
    chunks: list[Chunk] = []
    pending: list[Piece] = []
    pending_bytes = 0

    def flush(fmt: str) -> None:
        nonlocal pending, pending_bytes
        if pending:
            chunks.append(Chunk(len(chunks), fmt, tuple(pending)))
            pending, pending_bytes = [], 0

    for url, size in files:
        fmt = _format_of(url, requested_format)
        if fmt == "text":
            pending.append(Piece(url, 0, size))
            pending_bytes += size
            if pending_bytes >= chunk_bytes:
                flush("text")
        elif fmt == "jsonl" and _compression(url):  # a compressed stream has no byte ranges to seek to
            chunks.append(Chunk(len(chunks), "jsonl", (Piece(url, 0, size),)))
        elif fmt == "jsonl":
            for start in range(0, max(size, 1), chunk_bytes):
                chunks.append(Chunk(len(chunks), "jsonl", (Piece(url, start, min(size, start + chunk_bytes)),)))
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(url, "rb") as f:
                num_groups = pq.ParquetFile(f).num_row_groups
            for group in range(num_groups):
                chunks.append(Chunk(len(chunks), "parquet", (Piece(url, group, group + 1),)))
        else:
            raise SystemExit(f"unknown input format {fmt!r} for {url}")
    flush("text")
    return chunks


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int | None, bytes]]:
    """(line number or None, line) of a JSONL piece: a compressed file whole, numbered; else the lines whose first
    byte lies in [start, end), numbered only in the first range (elsewhere counting would mean reading from 0)."""
    compression = _compression(piece.url)
    with fsspec.open(piece.url, "rb", compression=compression) as f:
        if compression:  # some decompressors (zstd) have no readline: buffer them
            yield from enumerate(io.BufferedReader(f), start=1)
            return
        if piece.start > 0:  # a line belongs to the range holding its first byte
            f.seek(piece.start - 1)
            f.readline()
        start = f.tell()
        block = f.read(max(piece.end - start, 0))
        if block and not block.endswith(b"\n"):
            block += f.readline()  # the range's last line runs past its end
        lines = block.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        if piece.start == 0:
            yield from enumerate(lines, start=1)
        else:
            yield from ((None, line) for line in lines)


JSON_BATCH = 256  # JSONL lines parsed by one json.loads call


def _jsonl_texts(batch: list[tuple[int | None, bytes]], piece: Piece, text_field: str, counts: dict) -> Iterator[str]:
    """The text field of each (line number, line); a line that is not an object with a string there is counted."""
    try:  # one parse of the batch as an array; it fails (or miscounts) when a line is malformed
        records = json.loads(b"[" + b",".join(line for _, line in batch) + b"]")
    except ValueError:
        records = None
    if records is None or len(records) != len(batch):
        records = [_json_or_none(line) for _, line in batch]
    for (number, _), record in zip(batch, records):
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield text
            continue
        where = f":{number}" if number else f" (bytes {piece.start}-{piece.end})"
        _count_bad(counts, "bad_lines", "bad_line_examples", f"{piece.url}{where}")


def _count_bad(counts: dict, count_key: str, examples_key: str, where: str) -> None:
    counts[count_key] = counts.get(count_key, 0) + 1
    examples = counts.setdefault(examples_key, [])
    if len(examples) < BAD_EXAMPLES:
        examples.append(where)


def _undecodable(text: str) -> bool:
    """Binary or not UTF-8: NUL bytes, or more than 1 % replacement characters after decoding."""
    return "\x00" in text or text.count("\ufffd") * 100 > len(text)


def _json_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_documents(chunk: Chunk, text_field: str, counts: dict) -> Iterator[str]:
    """The documents of one chunk, in order. Malformed JSONL lines are skipped, counted in counts['bad_lines'] and
    the first few named in counts['bad_line_examples'] (url:line, or the byte range); so are text files that do not
    decode (binary, not UTF-8), in counts['undecodable_documents'] and counts['undecodable_examples']."""
    for piece in chunk.pieces:
        if chunk.input_format == "text":
            with fsspec.open(piece.url, "r", encoding="utf-8", errors="replace", compression="infer") as f:
                text = f.read()
            if _undecodable(text):
                _count_bad(counts, "undecodable_documents", "undecodable_examples", piece.url)
            else:
                yield text
        elif chunk.input_format == "jsonl":
            batch: list[tuple[int | None, bytes]] = []
            for number, line in _jsonl_lines(piece):
                if line.strip():
                    batch.append((number, line))
                if len(batch) == JSON_BATCH:
                    yield from _jsonl_texts(batch, piece, text_field, counts)
                    batch = []
            yield from _jsonl_texts(batch, piece, text_field, counts)
        else:
            import pyarrow.parquet as pq

            with fsspec.open(piece.url, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(piece.start, columns=[text_field])
            yield from (text for text in table.column(text_field).to_pylist() if text)


def sample_documents(chunk: Chunk, text_field: str, rate: float, seed: int) -> list[str]:
    """Documents selected for tokenizer training: a seeded hash decides, so the sample is the same on every run."""
    prefix = seed.to_bytes(8, "little")
    return [doc for doc in read_documents(chunk, text_field, {}) if zlib.crc32(prefix + doc.encode()) / 2**32 < rate]


def train_tokenizer(documents: list[str], cfg: TextPrepConfig) -> bytes:
    """A sentencepiece model (bytes). byte_fallback makes it lossless on any input."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "sample.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in documents:
                for line in doc.splitlines():
                    if line.strip():
                        f.write(line.strip() + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=os.path.join(tmp, "tok"),
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=1.0,
                byte_fallback=True,
                shuffle_input_sentence=False,
                input_sentence_size=0,
                num_threads=cfg.tokenizer_threads,
                minloglevel=2,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
            )
        except RuntimeError as error:  # sentencepiece says what is wrong after its source location
            raise SystemExit(f"sentencepiece cannot train this tokenizer: {str(error).split('] ')[-1]}") from None
        with open(os.path.join(tmp, "tok.model"), "rb") as f:
            return f.read()


ENCODE_BATCH = 256  # documents per sentencepiece call: one Python round trip for many documents
PACK_EVERY = 64  # windows cut from a split's token stream at once (bounds the stream held as Python ints)


class _Packer:
    """One split's token stream, cut into rows of `window` tokens in bulk."""

    def __init__(self, window: int, dtype: np.dtype):
        self.window, self.dtype = window, dtype
        self.stream: list[int] = []
        self.blocks: list[np.ndarray] = []

    def add(self, ids: list[int], eos: int) -> None:
        self.stream += ids
        self.stream.append(eos)
        if len(self.stream) >= PACK_EVERY * self.window:
            self._cut()

    def _cut(self) -> None:
        rows = len(self.stream) // self.window
        if rows:
            block = np.asarray(self.stream[: rows * self.window], dtype=self.dtype).reshape(rows, self.window)
            self.blocks.append(block)
            del self.stream[: rows * self.window]

    def finish(self) -> tuple[np.ndarray, int]:
        """(every full window, one row each; the tokens of the last, partial window, dropped)."""
        self._cut()
        samples = np.concatenate(self.blocks) if self.blocks else np.empty((0, self.window), self.dtype)
        return samples, len(self.stream)


def chunk_samples(chunk: Chunk, cfg: TextPrepConfig, tokenizer: bytes) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Fixed-length samples (rows of seq_len + 1 tokens) per split, and counts."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=tokenizer, num_threads=1)  # a Ray task has one core
    eos, dtype = processor.eos_id(), token_dtype(processor.get_piece_size())
    window = cfg.seq_len + 1
    counts = {"documents": 0, "tokens": 0, "dropped_tokens": 0, "dropped_documents": 0}
    packers = {split: _Packer(window, dtype) for split in SPLITS}
    kept: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}  # truncate mode: a window per document

    def encode(batch: list[str]) -> None:
        for doc, ids in zip(batch, processor.encode(batch)):
            split = "val" if is_validation_document(doc, cfg.val_percent) else "train"
            counts["tokens"] += len(ids)
            if cfg.mode == "pack":
                packers[split].add(ids, eos)
            elif len(ids) < window:
                counts["dropped_documents"] += 1
                counts["dropped_tokens"] += len(ids)
            else:
                kept[split].append(np.asarray(ids[:window], dtype=dtype))
                counts["dropped_tokens"] += len(ids) - window

    batch: list[str] = []
    for doc in read_documents(chunk, cfg.text_field, counts):
        counts["documents"] += 1
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            encode(batch)
            batch = []
    encode(batch)
    samples = {}
    for split in SPLITS:
        if cfg.mode == "pack":
            samples[split], tail = packers[split].finish()
            counts["dropped_tokens"] += tail  # each chunk's tail, shorter than a window
        else:
            samples[split] = np.stack(kept[split]) if kept[split] else np.empty((0, window), dtype)
    return samples, counts


def process_chunk(chunk: Chunk, cfg: TextPrepConfig, tokenizer: bytes) -> dict:
    """Tokenize one chunk, write its shards (temp name, then rename) and its marker; returns the marker."""
    fs, root = fsspec.core.url_to_fs(cfg.output)
    samples, counts = chunk_samples(chunk, cfg, tokenizer)
    per_shard = max(1, int(cfg.shard_mb * 2**20) // ((cfg.seq_len + 1) * samples["train"].itemsize))
    shards = {
        split: write_split_shards(fs, root, chunk.index, split, samples[split], per_shard, TOKENS_KEY, stacked=True)
        for split in SPLITS
    }
    return write_marker(fs, root, chunk.index, {"chunk": chunk.index, "counts": counts, "shards": shards})


def run(cfg: TextPrepConfig) -> dict:
    """The whole job; returns meta.json's content."""
    import ray

    files = list_inputs(cfg.inputs)
    fs, root = open_output(cfg.output, cfg.settings(), files)
    chunks = make_chunks(files, cfg.input_format, int(cfg.chunk_mb * 2**20))
    init_ray(cfg.ray_address, cfg.num_cpus)
    max_in_flight = cfg.max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 1))
    remote_sample = ray.remote(num_cpus=1)(sample_documents)
    remote_process = ray.remote(num_cpus=1)(process_chunk)
    started = time.perf_counter()

    tokenizer_path = f"{root}/{TOKENIZER_FILE}"
    if cfg.tokenizer:
        with fsspec.open(cfg.tokenizer, "rb") as f:
            tokenizer = f.read()
        if fs.exists(tokenizer_path) and fs.cat_file(tokenizer_path) != tokenizer:
            raise SystemExit(f"{cfg.output} already holds shards made with another tokenizer; use a new --output")
        write_atomic(fs, tokenizer_path, tokenizer)
    elif fs.exists(tokenizer_path):
        tokenizer = fs.cat_file(tokenizer_path)  # trained by an earlier, interrupted run of this job
    else:
        total_bytes = sum(size for _, size in files)
        rate = min(1.0, cfg.tokenizer_sample_mb * 2**20 / max(total_bytes, 1))
        sampled = ray.get([remote_sample.remote(chunk, cfg.text_field, rate, cfg.seed) for chunk in chunks])
        documents = [doc for chunk_docs in sampled for doc in chunk_docs]
        if not documents:
            raise SystemExit("the tokenizer sample is empty: are the inputs empty or is --text-field wrong?")
        tokenizer = train_tokenizer(documents, cfg)
        write_atomic(fs, tokenizer_path, tokenizer)

    tokenizer_ref = ray.put(tokenizer)

    def process(todo: list[int]):
        return bounded(lambda i: remote_process.remote(chunks[i], cfg, tokenizer_ref), todo, max_in_flight)

    markers, num_run = run_chunks(fs, root, [c.index for c in chunks], process, "tokenize + write shards")
    meta = assemble_meta(cfg, tokenizer, markers)
    check_bad_inputs(cfg, meta["counts"])
    write_atomic(fs, f"{root}/{META_FILE}", json.dumps(meta, indent=1).encode())
    elapsed = time.perf_counter() - started
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"prepared {meta['counts']['documents']:,} documents, {meta['counts']['tokens']:,} tokens in {elapsed:.1f} s "
        f"({num_run} of {len(chunks)} chunks run now): train {train['samples']:,} samples in "
        f"{len(train['shards'])} shards, val {val['samples']:,} in {len(val['shards'])}; {cfg.output}/{META_FILE}"
    )
    return meta


def check_bad_inputs(cfg: TextPrepConfig, counts: dict) -> None:
    """Say what was skipped; stop (before meta.json) when nothing is left or more than --max-bad-fraction was bad."""
    lines, undecodable = counts.get("bad_lines", 0), counts.get("undecodable_documents", 0)
    examples = counts.get("bad_line_examples", []) + counts.get("undecodable_examples", [])
    if not counts.get("documents"):
        raise SystemExit(
            f"no documents in {cfg.inputs} ({lines} malformed JSONL lines, {undecodable} undecodable files, e.g. "
            f"{examples[0] if examples else '-'}): check --input-format and --text-field"
        )
    if not lines + undecodable:
        return
    fraction = (lines + undecodable) / (lines + undecodable + counts["documents"])
    skipped = (
        f"{lines:,} malformed JSONL lines and {undecodable:,} undecodable (binary or not UTF-8) files, "
        f"{fraction:.2%} of the inputs' records, e.g. {', '.join(examples[:3])} (all counted, the first "
        f"{BAD_EXAMPLES} of each named, in meta.json)"
    )
    if fraction > cfg.max_bad_fraction:
        accept = math.ceil(fraction * 1000) / 1000
        raise SystemExit(
            f"skipped {skipped}: more than --max-bad-fraction {cfg.max_bad_fraction:g}. Fix the inputs and use a new "
            f"--output, or accept them: the same command with --max-bad-fraction {accept:g} (finished chunks are kept)"
        )
    print(f"warning: skipped {skipped}", flush=True)


def assemble_meta(cfg: TextPrepConfig, tokenizer: bytes, markers: list[dict]) -> dict:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=tokenizer)
    counts = merge_counts(markers)
    for examples in ("bad_line_examples", "undecodable_examples"):
        if examples in counts:
            counts[examples] = counts[examples][:BAD_EXAMPLES]
    return {
        "format": TEXT_FORMAT,
        "seq_len": cfg.seq_len,
        "sample_tokens": cfg.seq_len + 1,
        "mode": cfg.mode,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "type": "sentencepiece",
            "model_type": cfg.model_type,
            "vocab_size": processor.get_piece_size(),
            "eos_id": processor.eos_id(),
            "sha256": hashlib.sha256(tokenizer).hexdigest(),
        },
        "token_dtype": token_dtype(processor.get_piece_size()).name,
        "counts": counts,
        "splits": split_entries(markers),
        "settings": cfg.settings(),
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="ebwm-prep text", description=__doc__.splitlines()[0])
    d = TextPrepConfig(inputs=[], output="")
    parser.add_argument("--input", dest="inputs", nargs="+", required=True, help="fsspec URLs or globs")
    parser.add_argument("--output", required=True, help="dataset directory (fsspec URL)")
    parser.add_argument("--input-format", default=d.input_format, choices=["auto", "text", "jsonl", "parquet"])
    parser.add_argument("--text-field", default=d.text_field, help="JSONL field / parquet column")
    parser.add_argument("--tokenizer", default=d.tokenizer, help="reuse this sentencepiece .model")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size)
    parser.add_argument("--model-type", default=d.model_type, choices=["bpe", "unigram"])
    parser.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb)
    parser.add_argument(
        "--tokenizer-threads", type=int, default=d.tokenizer_threads, help="fixed: the trained model depends on it"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="picks the tokenizer's training sample")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--mode", default=d.mode, choices=["pack", "truncate"])
    parser.add_argument("--shard-mb", type=float, default=d.shard_mb)
    parser.add_argument("--chunk-mb", type=float, default=d.chunk_mb)
    parser.add_argument("--val-percent", type=float, default=d.val_percent)
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=d.max_bad_fraction,
        help="malformed JSONL lines + undecodable files, as a share of all records, above which the job stops",
    )
    parser.add_argument("--num-cpus", type=int, default=d.num_cpus, help="local Ray only; 0 = all cores")
    parser.add_argument("--ray-address", default=d.ray_address, help="'auto' on a cluster started by `ray up`")
    parser.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.seq_len < 1 or args.vocab_size < 8 or not 0 < args.val_percent < 100 or args.shard_mb <= 0:
        raise SystemExit("--seq-len must be >= 1, --vocab-size >= 8, --val-percent in (0, 100), --shard-mb > 0")
    if args.tokenizer_threads < 1 or not 0 <= args.max_bad_fraction <= 1:
        raise SystemExit("--tokenizer-threads must be >= 1, --max-bad-fraction in [0, 1]")
    run(TextPrepConfig(**vars(args)))


if __name__ == "__main__":
    main()
