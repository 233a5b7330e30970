"""Text shard formats compared in one run: bytes per token on disk and the shard loader's tokens/s, for the first
format (one int32 `.npy` member per sample) and the current one (one uint16 array per shard), on the same random
tokens, shards of --shard-mb of tokens as `ebwm-prep text` cuts them.

    python tools/bench_loader.py [--samples 100000] [--seq-len 256] [--vocab-size 32000] [--shard-mb 64]
        [--batch-size 32] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ebwm_scale.data.loader import ShardLoader, ShardSource
from ebwm_scale.data.shards import TEXT_FORMAT, TEXT_FORMAT_PER_SAMPLE, token_dtype, write_shard


def write_dataset(root: Path, tokens: np.ndarray, text_format: str, per_shard: int) -> int:
    """The samples (rows of `tokens`) as a train split in `text_format`; returns the bytes written."""
    (root / "train").mkdir(parents=True)
    shards = []
    for index, start in enumerate(range(0, len(tokens), per_shard)):
        rows = tokens[start : start + per_shard]
        if text_format == TEXT_FORMAT:
            members = [(f"{start:09d}", rows)]
        else:
            members = [(f"{start + i:09d}", row.astype(np.int32)) for i, row in enumerate(rows)]
        data = write_shard(members)
        name = f"train/{index:05d}.tar"
        (root / name).write_bytes(data)
        shards.append(
            {"name": name, "samples": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    meta = {"format": text_format, "splits": {"train": {"samples": len(tokens), "shards": shards}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return sum(s["bytes"] for s in shards)


def tokens_per_second(url: str, batch_size: int, workers: int, batches: int) -> float:
    loader = ShardLoader(ShardSource.open(url, "train"), batch_size, seed=0, num_workers=workers)
    next(loader)  # workers started, first shards read
    start = time.perf_counter()
    count = sum(next(loader)["tokens"].numel() for _ in range(batches))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dtype = token_dtype(args.vocab_size)
    tokens = rng.integers(0, args.vocab_size, (args.samples, args.seq_len + 1)).astype(dtype)
    batches = args.samples // args.batch_size - 2
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    results = {}
    for name, text_format, itemsize in (
        ("per-sample int32", TEXT_FORMAT_PER_SAMPLE, 4),
        ("uint16 array", TEXT_FORMAT, 2),
    ):
        per_shard = max(1, int(args.shard_mb * 2**20) // ((args.seq_len + 1) * itemsize))
        written = write_dataset(root / name.replace(" ", "_"), tokens, text_format, per_shard)
        speeds = {
            w: tokens_per_second(str(root / name.replace(" ", "_")), args.batch_size, w, batches)
            for w in map(int, args.workers.split(","))
        }
        results[name] = (written / tokens.size, speeds)
        shown = ", ".join(f"{w} workers {s / 1e6:.2f} M tokens/s" for w, s in speeds.items())
        print(f"{name}: {written / tokens.size:.3f} bytes/token; {shown}")
    (old_bytes, old_speeds), (new_bytes, new_speeds) = results.values()
    ratios = ", ".join(f"{w} workers {new_speeds[w] / old_speeds[w]:.2f}x" for w in new_speeds)
    print(f"uint16 array / per-sample int32: {new_bytes / old_bytes:.3f} of the bytes; tokens/s {ratios}")


if __name__ == "__main__":
    main()
