"""One validation vocabulary for every layer: shared checks, one message style.

Every check raises ``ValueError("<name>=<value!r> is not valid: expected <what>.")``: the message
names the argument and says what was expected. The command line turns the same checks into
argparse types (:func:`flag_type`), so a flag's error says the same thing.

Example:
    >>> integer("shots", 5, minimum=1)
    5
    >>> number("inner_lr", 0.0, above=0.0)
    Traceback (most recent call last):
    ...
    ValueError: inner_lr=0.0 is not valid: expected a finite number > 0.
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np


def invalid(name: str, value: Any, expected: str) -> ValueError:
    """The ValueError every check raises: ``name=value is not valid: expected ....``"""
    return ValueError(f"{name}={value!r} is not valid: expected {expected}.")


def integer(name: str, value: Any, minimum: int = 0) -> int:
    """`value` as an int, or raise unless it is an integer (not a bool) >= `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(name, value, f"an integer >= {minimum}")
    return int(value)


def number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None, finite: bool = True, convert: bool = False) -> float:
    """`value` as a float, or raise unless it is a number in the stated range.

    Args:
        above / at_least: exclusive / inclusive lower bound; below: exclusive upper bound.
        finite: refuse inf and NaN.
        convert: accept anything ``float()`` accepts (text from a file or flag); otherwise only
            real numbers (not bools).
    """
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if at_least is not None:
        parts.append(f">= {at_least:g}")
    expected = ("a finite number" if finite else "a number") + (" " + parts[0] if parts else "")
    if at_least is not None and below is not None:
        expected = f"a number in [{at_least:g}, {below:g})"
    elif below is not None:
        expected += f" < {below:g}"
    if isinstance(value, (bool, np.bool_)):
        raise invalid(name, value, expected)
    if convert:
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise invalid(name, value, expected) from None
    elif isinstance(value, numbers.Real):
        result = float(value)
    else:
        raise invalid(name, value, expected)
    if (finite and not math.isfinite(result)) or math.isnan(result):
        raise invalid(name, value, expected)
    if (above is not None and not result > above) or (at_least is not None and not result >= at_least) \
            or (below is not None and not result < below):
        raise invalid(name, value, expected)
    return result


def boolean(name: str, value: Any) -> bool:
    """`value` as a bool, or raise unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(name, value, "True or False")
    return bool(value)


def choice(name: str, value: Any, choices: Sequence) -> Any:
    """`value`, or raise unless it is one of `choices`."""
    if value not in tuple(choices):
        raise invalid(name, value, f"one of {tuple(choices)}")
    return value


def parse_boolean(text: Any) -> bool:
    """A flag's boolean: True/False, or the text true/false/yes/no/on/off/1/0."""
    if isinstance(text, (bool, np.bool_)):
        return bool(text)
    word = str(text).strip().lower()
    if word in ("true", "yes", "1", "on"):
        return True
    if word in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def flag_type(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    """An argparse type: `convert` the text, then require `ok(value)`; the error says what was
    expected (argparse adds the flag's name)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse
