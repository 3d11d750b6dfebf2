"""What every ``bitray`` parser shares: range-checked number types, the one-line error, parent parsers.

**Numbers.** Every int or float flag is declared with a ``Bounded`` type (``positive_int``,
``int_in(lo, hi)``, ``fraction``, ``config_field(EmbedConfig, "batch_size")``, ...), so a value out of
range is refused by argparse itself, naming the flag, before anything starts;
``tests/test_cli_input.py`` walks every parser and fails on a numeric flag declared without one. Flags
that set a config field take its bounds from the field (``config_field``), so the flag and the YAML key
can never disagree.

**Errors.** ``Parser`` prints one line, ``bitray CMD: error: argument --flag: ...``, and exits 2
(argparse's usage block is left out: ``--help`` shows it).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (subcommand parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


@dataclass(frozen=True)
class Bounded:
    """An argparse ``type=``: parses an int or a float and checks it lies in a range.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``; ``None`` is unbounded. NaN and infinities
    are refused.
    """

    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is not {self.describe()}")
        return value

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        """``an integer >= 1``, ``a number in [0, 1]``, ``a number > 0``."""
        noun = "an integer" if self.kind is int else "a number"
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {hi}"
        return noun


def int_in(lo: int | None = None, hi: int | None = None) -> Bounded:
    """Integers from ``lo`` to ``hi``, both included."""
    return Bounded(int, lo, hi)


def float_in(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Bounded:
    """Finite numbers from ``lo`` to ``hi`` (included unless ``lo_open`` / ``hi_open``)."""
    return Bounded(float, lo, hi, lo_open, hi_open)


positive_int = int_in(1)
non_negative_int = int_in(0)
seed = int_in(0, 2**32 - 1)  # numpy's and scikit-learn's seeds
positive_float = float_in(0, lo_open=True)
non_negative_float = float_in(0)
fraction = float_in(0, 1)
cosine = float_in(-1, 1)


def config_field(model: type, name: str) -> Bounded:
    """The range a pydantic config field declares (``Field(ge=, gt=, le=, lt=)``), as a flag type.

    ``int | None`` fields give ints; a field without bounds is refused here, so a flag cannot set a
    number its config leaves unchecked.
    """
    info = model.model_fields[name]
    kind = float if _accepts(info.annotation, float) and not _accepts(info.annotation, int) else int
    bounds: dict[str, Any] = {}
    for rule in info.metadata:
        for attr, key, is_open in (
            ("ge", "lo", False),
            ("gt", "lo", True),
            ("le", "hi", False),
            ("lt", "hi", True),
        ):
            value = getattr(rule, attr, None)
            if value is not None:
                bounds[key] = value
                bounds[f"{key}_open"] = is_open
    if not bounds:
        raise TypeError(f"{model.__name__}.{name} declares no range; give it Field(ge=..., ...)")
    return Bounded(kind, **bounds)


def config_overrides(model: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags that set fields of ``model`` (same names), for ``load_config``; ``None``: not given."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields}


def _accepts(annotation: Any, kind: type) -> bool:  # noqa: ANN401 - a typing annotation
    return annotation is kind or kind in getattr(annotation, "__args__", ())


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def address_parent(help_text: str = "Ray cluster address (default: RAY_ADDRESS or local)") -> Parser:
    """The ``--address`` flag, declared once for every command that reaches a Ray cluster or job server."""
    parent = Parser(add_help=False)
    parent.add_argument("--address", metavar="ADDR", help=help_text)
    return parent
