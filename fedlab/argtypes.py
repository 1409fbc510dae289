"""Argument types shared by the `fedlab` command and the `%fed` magics (both argparse-based).

Each turns a bad value into ``argparse.ArgumentTypeError`` with a message that says what a
good one looks like; the caller decides how the error reaches the user (an exit code, a
``UsageError``).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "seconds"]


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds(text: str) -> float:
    """A finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value
