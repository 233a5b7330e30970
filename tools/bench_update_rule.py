"""Which MCMC step size and start noise fit which text update rule (`mcmc.update_space`: probs | logits), per V.

For every vocabulary size V and every setting "rule:alpha_init:init_scale:alpha_lr_multiplier" (default: the
official values under both rules, and the project's tiny-recipe values under both rules), a tiny text EBT is
(a) measured at initialization: the loss after MCMC step 1 and step 2 on held-out batches, chains started from fixed
noise, the same weights for every setting (one seed); and (b) trained for --steps optimizer steps (AdamW, warmup
then cosine, alpha in its own group at lr * alpha_lr_multiplier, global grad-norm clip, non-finite steps skipped as
the trainer does): the loss after step 1 and step 2 (mean of the last --last training steps) and the final alpha.
An AR model of the same size trains on the same batches for reference.

Data: a learnable synthetic language that works at any V, generated here (no downloads): a fixed random sparse
first-order Markov chain over V tokens; each token has --successors likely successors drawn from a Zipf
distribution over the vocabulary, so most of the chain's mass sits on a few thousand tokens even at V = 50k.
Sequences start from the chain's stationary distribution, so its entropies are exact anchors: ln V (uniform), H1
(the stationary unigram entropy: a context-free model) and H (the entropy rate: the best possible loss). Every
setting sees the same batches in the same order and the same start-noise draws.

    python tools/bench_update_rule.py [--vocab-sizes 256,8192,32768,50277] [--steps 200] [--threads 1]
        [--settings probs:500:1:1500,logits:500:1:1500,logits:20:0.1:100,probs:20:0.1:100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective, split_batch
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.engines.base import set_lr
from ebwm_scale.train.optim import OptimConfig, lr_at

DEFAULT_SETTINGS = "probs:500:1:1500,logits:500:1:1500,logits:20:0.1:100,probs:20:0.1:100"


@dataclass(frozen=True)
class Setting:
    rule: str  # probs | logits
    alpha_init: float
    init_scale: float
    alpha_lr_multiplier: float

    @classmethod
    def parse(cls, text: str) -> Setting:
        rule, alpha, noise, multiplier = text.split(":")
        return cls(rule, float(alpha), float(noise), float(multiplier))

    @property
    def name(self) -> str:
        return f"{self.rule} a{self.alpha_init:g} n{self.init_scale:g} m{self.alpha_lr_multiplier:g}"


class MarkovLanguage:
    """A fixed random sparse first-order Markov chain over `vocab_size` tokens (deterministic in `seed`)."""

    SUCCESSOR_PROBS = (0.55, 0.25, 0.12, 0.08, 0.05, 0.03, 0.02)

    def __init__(self, vocab_size: int, successors: int = 4, zipf: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        rank = rng.permutation(vocab_size)  # each token's popularity rank as a successor
        popularity = 1.0 / (rank + 1.0) ** zipf
        popularity /= popularity.sum()
        self.vocab_size = vocab_size
        self.next = rng.choice(vocab_size, size=(vocab_size, successors), p=popularity)  # (V, k)
        probs = np.array(self.SUCCESSOR_PROBS[:successors], dtype=np.float64)
        self.probs = probs / probs.sum()
        self.stationary = self._stationary(popularity)
        self.entropy_rate = float(self.stationary @ self._row_entropies())
        nonzero = self.stationary[self.stationary > 0]
        self.unigram_entropy = float(-(nonzero * np.log(nonzero)).sum())

    def _stationary(self, start: np.ndarray, iterations: int = 500) -> np.ndarray:
        """Power iteration of the lazy chain (same stationary distribution, and it converges even if periodic)."""
        pi = start.copy()
        for _ in range(iterations):
            weights = (pi[:, None] * self.probs[None, :]).ravel()
            moved = np.bincount(self.next.ravel(), weights=weights, minlength=self.vocab_size)
            pi = 0.5 * (pi + moved)
        return pi / pi.sum()

    def _row_entropies(self) -> np.ndarray:
        """Entropy of each token's successor distribution (repeated successors merged)."""
        entropies = np.empty(self.vocab_size)
        for token, row in enumerate(self.next):
            merged = np.bincount(np.unique(row, return_inverse=True)[1], weights=self.probs)
            entropies[token] = -(merged * np.log(merged)).sum()
        return entropies

    def batches(self, count: int, batch_size: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            tokens = np.empty((batch_size, length), dtype=np.int64)
            tokens[:, 0] = rng.choice(self.vocab_size, size=batch_size, p=self.stationary)
            picks = rng.choice(len(self.probs), size=(batch_size, length - 1), p=self.probs)
            for i in range(1, length):
                tokens[:, i] = self.next[tokens[:, i - 1], picks[:, i - 1]]
            out.append({"tokens": torch.from_numpy(tokens)})
        return out


def build(kind: str, vocab_size: int, setting: Setting | None, args, weights: dict | None = None):
    cfg = ModelConfig(
        kind=kind,
        vocab_size=vocab_size,
        dim=args.dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        step_conditioning=args.step_conditioning if kind == "ebt" else "none",
    )
    torch.manual_seed(args.seed)
    model = cfg.build()
    if weights is not None:
        model.load_state_dict(weights)
    mcmc = MCMCConfig(num_steps=args.mcmc_steps)
    if setting is not None:
        mcmc = MCMCConfig(
            num_steps=args.mcmc_steps,
            alpha_init=setting.alpha_init,
            init_scale=setting.init_scale,
            alpha_lr_multiplier=setting.alpha_lr_multiplier,
            update_space=setting.rule,
        )
    return build_objective(model, mcmc.build())


def at_init(objective, batches, seed: int) -> list[float]:
    """Mean loss after each MCMC step over `batches`, chains from seeded noise, no noise or jitter in the steps."""
    torch.manual_seed(seed)
    sums = None
    for batch in batches:
        ctx, target = split_batch(batch)
        losses = [float(loss) for loss in objective.predict(ctx, target).losses]
        sums = losses if sums is None else [a + b for a, b in zip(sums, losses)]
    return [value / len(batches) for value in sums]


def train(objective, batches, alpha_lr_multiplier: float, args, label: str) -> dict:
    """--steps optimizer steps on `batches` (in order); means of the last --last steps' metrics."""
    optim_cfg = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps)
    optimizer = optim_cfg.build(objective, alpha_lr_multiplier)
    params = [p for p in objective.parameters() if p.requires_grad]
    torch.manual_seed(args.seed + 1)  # the same start-noise draws for every setting
    history: list[dict[str, float]] = []
    skipped = 0
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        set_lr(optimizer, partial(lr_at, step, optim_cfg, len(batches)))
        out = objective(batch)
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip))
        metrics = {key: float(value) for key, value in out.metrics.items()}
        if all(math.isfinite(v) for v in metrics.values()) and math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        history.append(metrics)
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == len(batches)):
            shown = " ".join(f"{k} {metrics[k]:.3f}" for k in metrics if k.startswith("loss_step") or k == "loss")
            alpha = f" alpha {metrics['alpha']:.4g}" if "alpha" in metrics else ""
            print(
                f"  [{label}] step {step + 1}/{len(batches)} {shown}{alpha} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    last = history[-args.last :]
    final = {key: sum(m[key] for m in last) / len(last) for key in last[0]}
    if "alpha" in final:
        final["alpha"] = float(objective.mcmc.step_size().detach())
    final.update(skipped=skipped, seconds_per_step=seconds / len(batches))
    return final


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_alpha(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", default="256,8192,32768,50277")
    parser.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="comma-separated rule:alpha_init:init_scale:alpha_lr_multiplier"
    )
    parser.add_argument("--no-ar", action="store_true", help="skip the AR reference rows")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per setting")
    parser.add_argument("--last", type=int, default=10, help="final losses are the mean of the last this many steps")
    parser.add_argument("--init-batches", type=int, default=4, help="held-out batches for the at-init losses")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--step-conditioning", default="none", help="model.step_conditioning of the EBT")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--successors", type=int, default=4, help="likely successors per token of the Markov chain")
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the successors' popularity")
    parser.add_argument("--seed", type=int, default=0, help="weights, chain and start noise")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2-thread OpenMP stalls when the cores are shared)"
    )
    parser.add_argument("--log-every", type=int, default=50, help="progress line every this many steps; 0: none")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [Setting.parse(text) for text in args.settings.split(",") if text]
    vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    print(
        f"EBT text {args.num_layers} x {args.dim} ({args.num_heads} heads, step conditioning {args.step_conditioning}),"
        f" S {args.seq_len}, B {args.batch_size}, {args.mcmc_steps} MCMC steps, {args.steps} AdamW steps (lr "
        f"{args.lr:g}, warmup {args.warmup_steps} then cosine); Markov chain with {args.successors} successors, zipf "
        f"{args.zipf:g}; torch {torch.__version__}, {args.threads} threads, {platform.machine()}, commit "
        f"{commit or 'unknown'}",
        flush=True,
    )
    wall = time.perf_counter()
    rows = []
    for vocab_size in vocab_sizes:
        language = MarkovLanguage(vocab_size, args.successors, args.zipf, seed=args.seed)
        length = args.seq_len + 1
        train_batches = language.batches(args.steps, args.batch_size, length, seed=args.seed + 1)
        held_out = language.batches(args.init_batches, args.batch_size, length, seed=args.seed + 2)
        anchors = {
            "ln_v": math.log(vocab_size),
            "unigram_entropy": language.unigram_entropy,
            "entropy_rate": language.entropy_rate,
        }
        print(
            f"V={vocab_size}: ln V {anchors['ln_v']:.3f}, stationary unigram entropy H1 "
            f"{anchors['unigram_entropy']:.3f}, entropy rate H {anchors['entropy_rate']:.3f}",
            flush=True,
        )
        weights = build("ebt", vocab_size, None, args).model.state_dict()  # every setting starts from these
        for setting in settings:
            objective = build("ebt", vocab_size, setting, args, weights)
            init_losses = at_init(objective, held_out, args.seed + 2)
            final = train(objective, train_batches, setting.alpha_lr_multiplier, args, f"V={vocab_size} {setting.name}")
            row = {
                "vocab_size": vocab_size,
                "setting": setting.name,
                **{k: v for k, v in vars(setting).items()},
                **anchors,
                "init_loss_steps": init_losses,
                "final_loss_steps": [final[f"loss_step{k}"] for k in range(args.mcmc_steps)],
                "final_alpha": final["alpha"],
                "skipped": final["skipped"],
                "seconds_per_step": final["seconds_per_step"],
            }
            rows.append(row)
            print(
                f"V={vocab_size} {setting.name}: init {' / '.join(fmt(x) for x in init_losses)}, trained "
                f"{' / '.join(fmt(x) for x in row['final_loss_steps'])}, alpha {fmt_alpha(final['alpha'])}, "
                f"{final['seconds_per_step']:.2f} s/step",
                flush=True,
            )
        if not args.no_ar:
            objective = build("ar", vocab_size, None, args)
            final = train(objective, train_batches, 1.0, args, f"V={vocab_size} ar")
            rows.append(
                {
                    "vocab_size": vocab_size,
                    "setting": "ar",
                    "rule": "ar",
                    **anchors,
                    "init_loss_steps": None,
                    "final_loss_steps": [final["loss"]],
                    "final_alpha": None,
                    "skipped": final["skipped"],
                    "seconds_per_step": final["seconds_per_step"],
                }
            )
            print(f"V={vocab_size} ar: trained {final['loss']:.3f}, {final['seconds_per_step']:.2f} s/step", flush=True)

    steps = args.mcmc_steps
    init_cols = " | ".join(f"init step {k + 1}" for k in range(steps))
    final_cols = " | ".join(f"trained step {k + 1}" for k in range(steps))
    print()
    print(f"| V | ln V | H1 / H | setting | {init_cols} | {final_cols} | final alpha | skipped | s/step |")
    print("|" + "---|" * (7 + 2 * steps))
    for row in rows:
        init = row["init_loss_steps"] or [None] * steps
        trained = row["final_loss_steps"] + [None] * (steps - len(row["final_loss_steps"]))
        print(
            f"| {row['vocab_size']} | {row['ln_v']:.3f} | {row['unigram_entropy']:.2f} / {row['entropy_rate']:.2f} "
            f"| {row['setting']} | {' | '.join(fmt(x) for x in init)} | {' | '.join(fmt(x) for x in trained)} "
            f"| {fmt_alpha(row['final_alpha'])} | {row['skipped']} | {row['seconds_per_step']:.2f} |"
        )
    print(f"\nwall time {time.perf_counter() - wall:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "commit": commit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
