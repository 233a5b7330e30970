"""EBT text generation speed: tokens/s with and without the KV cache, and the cost of each extra MCMC step.

A randomly initialised EBT (speed does not depend on the weights) continues a prompt token by token; each token is
refined by N MCMC steps. Without the cache every token re-encodes the whole sequence; with it, only the new token.

    python tools/bench_generate.py [--dim 256] [--num-layers 4] [--prompt-len 128] [--num-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.inference.think import Generator, ThinkConfig
from ebwm_scale.models import ModelConfig


def tokens_per_second(objective, prompt: torch.Tensor, num_tokens: int, steps: int, use_cache: bool) -> float:
    generator = Generator(objective, ThinkConfig(num_steps=steps))
    generator.generate(prompt, 2, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    generator.generate(prompt, num_tokens, use_cache=use_cache)
    return num_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--num-tokens", type=int, default=32)
    parser.add_argument("--steps", default="1,2,4", help="MCMC steps per token to measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(kind="ebt", dim=args.dim, num_layers=args.num_layers, num_heads=8, vocab_size=args.vocab_size)
    objective = build_objective(cfg.build(), MCMCConfig().build())
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len))
    print(f"EBT {args.num_layers} x {args.dim}, prompt {args.prompt_len} tokens, {args.num_tokens} new tokens, CPU")
    for steps in (int(s) for s in args.steps.split(",")):
        cached = tokens_per_second(objective, prompt, args.num_tokens, steps, use_cache=True)
        plain = tokens_per_second(objective, prompt, args.num_tokens, steps, use_cache=False)
        print(
            f"{steps} MCMC step(s): {cached:.1f} tokens/s with the KV cache, {plain:.1f} without "
            f"({cached / plain:.2f}x); {1e3 / cached / steps:.1f} ms per step per token (cached)"
        )


if __name__ == "__main__":
    main()
