"""The System-2 inference options that ebwm-generate and ebwm-eval share (inference/think.py ThinkConfig; the official
--infer_* flags of alexiglad/EBT named in each help line)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ebwm_scale.errors import at_least
from ebwm_scale.inference.think import Selection, ThinkConfig


def add_think_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thinking (System-2 inference)")
    group.add_argument(
        "--final-landscape-only",
        action="store_true",
        help="--steps-per-landscape on the final trained landscape only, one step on each other "
        "(official --infer_steps_final_landscape)",
    )
    group.add_argument(
        "--select",
        choices=Selection.values(),
        default=Selection.min.value,
        help="which of the --best-of chains each position keeps: the lowest final energy, the highest, or the largest "
        "drop from its first energy (official --infer_energy_sampling_technique)",
    )
    group.add_argument(
        "--alpha",
        type=at_least(0, float),
        default=0.0,
        help="override the trained step size: below 1 a factor on it, from 1 the step size itself; 0: the trained "
        "one (official --infer_ebt_override_alpha)",
    )
    group.add_argument(
        "--alpha-final-landscape",
        action="store_true",
        help="--alpha on the final trained landscape only, the trained step size before it "
        "(official --infer_alpha_final_landscape)",
    )
    group.add_argument(
        "--langevin",
        type=at_least(0, float),
        default=0.0,
        help="Langevin noise std before each step, on the state (text) or on the embedded candidate (frames) "
        "(official --infer_langevin_dynamics_noise)",
    )
    group.add_argument(
        "--langevin-first-step",
        action="store_true",
        help="the --langevin noise before the first step only (official --infer_langevin_first_step)",
    )
    group.add_argument(
        "--accept-lower-energy",
        action="store_true",
        help="a position takes a step only if it lowers its energy, else stays (one more energy evaluation per "
        "step; official --infer_accept_lower_energies)",
    )
    group.add_argument(
        "--early-exit", type=at_least(0, float), default=0.0, help="stop a position once a step gains < this energy"
    )


def think_options(parser: argparse.ArgumentParser, args: argparse.Namespace, **config: Any) -> ThinkConfig:
    """The ThinkConfig of the parsed options (plus `config`); a modifier without what it modifies is a usage error."""
    for modifier, needs, value in (
        ("--alpha-final-landscape", "--alpha", args.alpha),
        ("--langevin-first-step", "--langevin", args.langevin),
        ("--final-landscape-only", "--steps-per-landscape", args.steps_per_landscape),
    ):
        if getattr(args, modifier[2:].replace("-", "_")) and not value:
            parser.error(f"{modifier} needs {needs}")
    options = ThinkConfig(
        final_landscape_only=args.final_landscape_only,
        select=Selection(args.select),
        alpha=args.alpha,
        alpha_final_landscape=args.alpha_final_landscape,
        langevin_noise_std=args.langevin,
        langevin_first_step=args.langevin_first_step,
        accept_lower_energy=args.accept_lower_energy,
        early_exit_eps=args.early_exit,
    )
    return replace(options, **config)
