"""The one exception type users see: a one-line message naming the problem and the fix."""

from __future__ import annotations


class SafetylockError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""


# Useful strengths measured so far lie between 0.75 and 8 (README, calibrate); at 16 the output already breaks.
# The cap only refuses values that cannot be meant (1e30 passes a finite check and destroys the model).
MAX_ALPHA = 100.0


def check_finite(value: object, what: str) -> float:
    """Return `value` as a float if it is a finite number (a logit threshold may take any sign); raise otherwise."""
    import math

    if isinstance(value, bool) or value is None:
        raise SafetylockError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SafetylockError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SafetylockError(f"{what} must be finite, got {number!r}")
    return number


def check_alpha(value: object, what: str = "--alpha") -> float:
    """Return `value` as a float if it is a usable lock strength (finite, > 0, <= MAX_ALPHA); raise otherwise.

    A negative alpha would steer away from refusals (an unlock) and NaN poisons every reply, even where a
    conditional mask multiplies it by zero, so both are refused at every entry rather than applied.
    """
    import math

    if isinstance(value, bool) or value is None:
        raise SafetylockError(f"{what} must be a number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise SafetylockError(f"{what} must be a number, got {value!r}") from None
    number = float(value)
    if not math.isfinite(number) or number <= 0 or number > MAX_ALPHA:
        raise SafetylockError(f"{what} must be a finite number > 0 and <= {MAX_ALPHA:g}, got {number!r}")
    return number
