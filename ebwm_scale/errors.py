"""User errors end a console command with one line, `Name: message`, and exit code 2; a bug keeps its traceback.

Every error a user can cause (a bad recipe, a missing checkpoint, a corrupt dataset, a launch that cannot work)
derives from UserError. `--debug` on any command (or EBWM_DEBUG=1) shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An error in what the user asked for or gave (input, recipe, files), not in the program."""


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run a console command's main(argv): a UserError, or a SystemExit with a message, becomes one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EBWM_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except UserError as error:
        if debug:
            raise
        lines = str(error).strip().splitlines() or [""]
        print(f"{type(error).__name__}: {lines[0]}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except SystemExit as stop:
        if isinstance(stop.code, str):  # a check that stopped the command with its message
            if debug:
                raise
            print(f"error: {stop.code}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        raise


Number = TypeVar("Number", int, float)


def at_least(minimum: float, kind: Callable[[str], Number] = int) -> Callable[[str], Number]:
    """An argparse type: a number of `kind` that is >= minimum (argparse turns a refusal into a usage line)."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
        return value

    return parse


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= minimum (e.g. --steps 1,2,4)."""
    one = at_least(minimum)
    return lambda text: [one(part.strip()) for part in text.split(",")]
