"""`ebwm-generate`: text or frames from an export or a checkpoint, with System-2 thinking
(ebwm_scale/inference/think.py)."""

from __future__ import annotations

import torch

from ebwm_scale.cli.think_options import add_think_options, think_options
from ebwm_scale.core.mcmc import schedule_of
from ebwm_scale.errors import at_least, run_cli
from ebwm_scale.inference.think import Generator


def text_tokenizer(cfg, model: bytes | None = None):
    """(encode, decode) for a text model: bytes for the stdlib corpus, else a sentencepiece model (`model`, by
    default the run's shards' one), which must not have more pieces than the model has token ids."""
    from ebwm_scale.train.checkpoint import CheckpointError

    if cfg.data.source == "stdlib_docs" and model is None:
        from ebwm_scale.data.text import ByteTokenizer

        tokenizer = ByteTokenizer()
        return (lambda text: tokenizer.encode(text).astype("int64")), tokenizer.decode
    import sentencepiece as spm

    if model is None:
        model = read_tokenizer(f"{cfg.data.shards.urls[0].rstrip('/')}/tokenizer.model")
    processor = spm.SentencePieceProcessor(model_proto=model)
    if processor.get_piece_size() > cfg.model.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {processor.get_piece_size()} pieces, the model {cfg.model.vocab_size} token ids: "
            "not the tokenizer it was trained with"
        )
    return (lambda text: processor.encode(text)), (lambda ids: processor.decode([int(i) for i in ids]))


def read_tokenizer(url: str) -> bytes:
    import fsspec

    from ebwm_scale.train.checkpoint import CheckpointError

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except OSError as error:
        raise CheckpointError(f"cannot read the tokenizer {url}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    from ebwm_scale.inference.export import TOKENIZER_FILE, exported_tokenizer, load_model
    from ebwm_scale.train.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="ebwm-generate", description="Generate text with a trained EBT, thinking")
    parser.add_argument("model", help="an export directory, a checkpoint, or with --latest a checkpoint_dir")
    parser.add_argument("--latest", action="store_true")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num-tokens", type=at_least(1), default=64)
    parser.add_argument(
        "--steps",
        type=at_least(0),
        default=0,
        help="MCMC steps per token, step k on landscape k (later ones on the last trained); 0: the trained schedule, "
        "each landscape its most steps",
    )
    parser.add_argument(
        "--steps-per-landscape",
        type=at_least(0),
        default=0,
        help="instead of --steps: this many steps on each trained landscape (official --infer_ebt_num_steps)",
    )
    parser.add_argument(
        "--best-of", type=at_least(1), default=1, help="chains per token (official --infer_generated_samples)"
    )
    parser.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0: greedy")
    parser.add_argument("--no-cache", action="store_true", help="recompute the context for every token")
    parser.add_argument(
        "--tokenizer", default="", help="a sentencepiece .model (default: the export's, else the run's shards')"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_think_options(parser)
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt must not be empty: generation continues a text")
    if args.steps and args.steps_per_landscape:
        parser.error("give --steps or --steps-per-landscape, not both")
    think_cfg = think_options(
        parser, args, num_steps=args.steps, steps_per_landscape=args.steps_per_landscape, best_of=args.best_of
    )
    cfg, objective = load_model(args.model, args.latest)
    if cfg.model.modality != "text":
        raise SystemExit("ebwm-generate writes text; for frame models use tools/render_predictions.py")
    generator = Generator(objective, think_cfg)
    tokenizer = exported_tokenizer(args.model)
    if args.tokenizer:
        given = read_tokenizer(args.tokenizer)
        if tokenizer is not None and given != tokenizer:
            raise CheckpointError(
                f"--tokenizer {args.tokenizer} is not the tokenizer {args.model} was trained with (the export's own "
                f"{TOKENIZER_FILE}): leave --tokenizer out"
            )
        tokenizer = given
    encode, decode = text_tokenizer(cfg, tokenizer)
    prompt = torch.as_tensor(encode(args.prompt), dtype=torch.long)[None]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokens, thoughts = generator.generate(prompt, args.num_tokens, args.temperature, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    energies = torch.cat([t.energy[:, -1] for t in thoughts])
    spreads = torch.cat([t.energy_spread[:, -1] for t in thoughts])
    steps = torch.cat([t.steps_used[:, -1] for t in thoughts])
    print(decode(tokens[0].tolist()))
    print(
        f"\n{args.num_tokens} tokens in {seconds:.2f} s ({args.num_tokens / seconds:.1f} tokens/s, "
        f"{'no cache' if args.no_cache else 'KV cache'}); {len(schedule_of(generator.num_steps))} steps max, "
        f"{steps.mean():.2f} used on average; energy {energies.mean():.3f} "
        f"(min {energies.min():.3f}, max {energies.max():.3f}); spread over {args.best_of} chains {spreads.mean():.3f}"
    )


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
