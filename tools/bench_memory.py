"""Memory of the text EBT's vocabulary state: `mcmc.vocab_state: plain` (autograd softmax, V->D map, step and
cross-entropy) vs `lean` (the default: fused, chunked Functions that keep K + 1 B x S x V tensors for K MCMC steps
under probs, 2K + 1 under logits), under the update rule `--update-space` (probs, the official default, or logits).

One training step (forward, energy gradients with graph, outer backward) per vocabulary size, same weights and
batch. Prints the peak memory the step adds (CPU: the process's peak RSS, reset before the step; CUDA: the
allocator's peak), the bytes autograd saves for backward, the median step time, and plain / lean ratios.

    python tools/bench_memory.py [--vocab-sizes 8192,32768,50257] [--seq-len 256] [--batch-size 4] [--dim 256]
        [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from bench_pp import SavedTensorBytes  # tools/ is this script's directory

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig


class PeakMemory:
    """Peak bytes above the level at entry: the CUDA allocator's peak, or on CPU the kernel's resident-set
    high-water mark, reset at entry through /proc (tensors this large are mmap-ed, so RSS follows them)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start = self._rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = self._rss_kb("VmHWM") * 1024 - self.start


def measure(vocab_state: str, vocab_size: int, args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="ebt",
        vocab_size=vocab_size,
        dim=args.dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        ffn_hidden_dim=args.ffn_hidden_dim,
    )
    mcmc = MCMCConfig(
        num_steps=args.mcmc_steps, alpha_init=50.0, vocab_state=vocab_state, update_space=args.update_space
    )
    objective = build_objective(cfg.build(), mcmc.build())
    objective.to(device)
    batch = {"tokens": torch.randint(0, vocab_size, (args.batch_size, args.seq_len + 1), device=device)}
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    )

    def step() -> float:
        with autocast:
            loss = objective(batch).loss
        loss.backward()
        objective.zero_grad(set_to_none=False)  # gradient buffers stay allocated: not part of what we compare
        return loss.item()

    step()  # warm-up; also allocates the gradient buffers
    with PeakMemory(device) as peak:
        loss = step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()  # .item() inside waits for the device
        times.append(time.perf_counter() - start)
    with SavedTensorBytes() as saved, autocast:
        objective(batch).loss.backward()
    seconds = statistics.median(times)
    state_bytes = args.batch_size * args.seq_len * vocab_size * 4
    state_saved = sum(size for _, size in saved.seen if size >= state_bytes)  # the B x S x V tensors
    return {
        "peak_mb": peak.peak / 2**20,
        "saved_mb": saved.bytes / 2**20,
        "state_saved_mb": state_saved / 2**20,
        "seconds": seconds,
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", default="8192,32768,50257")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--ffn-hidden-dim", type=int, default=0, help="0: Llama's 8/3 x dim")
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--update-space", choices=["probs", "logits"], default="probs")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median) after the measured one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = args.batch_size * args.seq_len
    print(
        f"EBT text {args.num_layers} x {args.dim}, {rows} positions (B {args.batch_size} x S {args.seq_len}), "
        f"{args.mcmc_steps} MCMC steps ({args.update_space}), {device.type} {args.precision}; "
        "one B x S x V fp32 tensor = rows * V * 4 B"
    )
    for vocab_size in (int(v) for v in args.vocab_sizes.split(",")):
        plain = measure("plain", vocab_size, args, device)
        lean = measure("lean", vocab_size, args, device)
        state_mb = rows * vocab_size * 4 / 2**20
        # Tiny sizes fit in memory the process already holds: RSS then does not grow and the ratio is undefined.
        peak_ratio = f"{plain['peak_mb'] / lean['peak_mb']:.2f}x" if lean["peak_mb"] > 0 else "n/a (no RSS growth)"
        print(
            f"V={vocab_size} (state {state_mb:.0f} MB): "
            f"plain peak {plain['peak_mb']:.0f} MB, saved {plain['saved_mb']:.0f} MB "
            f"({plain['state_saved_mb']:.0f} state-sized), {plain['seconds'] * 1e3:.0f} ms; "
            f"lean peak {lean['peak_mb']:.0f} MB, saved {lean['saved_mb']:.0f} MB "
            f"({lean['state_saved_mb']:.0f} state-sized), {lean['seconds'] * 1e3:.0f} ms; "
            f"plain / lean = {peak_ratio} peak, "
            f"{plain['saved_mb'] / lean['saved_mb']:.2f}x saved, {plain['seconds'] / lean['seconds']:.2f}x time "
            f"(loss {plain['loss']:.4f} vs {lean['loss']:.4f})"
        )


if __name__ == "__main__":
    main()
