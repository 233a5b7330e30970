"""What the System-2 replay buffer (`mcmc.replay`) costs per storage choice: its memory at a recipe's size, and the
time to store a batch's final states and to replay a sample of them, at a large vocabulary.

Memory is exact: size x (S + 1) token ids + size x S x V states in the storage dtype (the official buffer, 192 x 256 x
50,277 fp32, is 9.9 GB per rank). Time is measured on `--device` with `--batch-size` fresh sequences per store and
half as many replayed per extend (the official share), over a buffer of `--measure-size` sequences; `device: cpu`
keeps the buffer in (pinned, on a GPU machine) host memory and copies to and from `--device` every step.

    python tools/bench_replay.py [--vocab-size 50277] [--seq-len 256] [--size 192] [--batch-size 32]
        [--measure-size 32] [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ebwm_scale.core.mcmc import ReplayConfig
from ebwm_scale.core.replay import DTYPES, ReplayBuffer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=50277)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--size", type=int, default=192, help="the recipe's buffer, for the memory column")
    parser.add_argument("--batch-size", type=int, default=32, help="fresh sequences stored per step")
    parser.add_argument("--measure-size", type=int, default=32, help="the buffer the timings run on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch, seq_len, vocab = args.batch_size, args.seq_len, args.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    final = torch.randn(batch, seq_len, vocab, device=device)
    start = torch.randn(batch, seq_len, vocab, device=device)
    print(f"V={vocab} S={seq_len} batch={batch} (+{batch // 2} replayed) on {device}; memory at size={args.size}")
    print(f"{'dtype':>9} {'device':>6} {'memory GB':>10} {'store ms':>9} {'extend ms':>10}")
    for dtype in ("float32", "bfloat16"):
        for where in ("model", "cpu"):
            buffer = ReplayBuffer(ReplayConfig(size=args.measure_size, dtype=dtype, device=where))
            store = _median_seconds(lambda b=buffer: b.store(tokens, final), device, args.repeats)
            extend = _median_seconds(lambda b=buffer: b.extend(tokens, start), device, args.repeats)
            element = torch.empty((), dtype=DTYPES[dtype]).element_size()
            memory = args.size * (seq_len * vocab * element + (seq_len + 1) * tokens.element_size())
            print(f"{dtype:>9} {where:>6} {memory / 1e9:10.2f} {store * 1e3:9.1f} {extend * 1e3:10.1f}")
            del buffer


if __name__ == "__main__":
    main()
