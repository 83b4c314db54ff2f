"""The verdict rule, fixed before any number is seen.

Every claim is a statistic oriented so that the paper's claim is "large": a difference that the paper says is
above 0, or a ratio that the paper puts in a range [low, high]. The claim's side is the set of values the claim
allows: above the threshold (strictly: a difference of 0 is no improvement), or at least the range's lower end (a
speed-up beyond the upper end still supports "faster", and the reason says so). With the 95% interval [lo, hi]:

- reproduced: the interval lies wholly on the claim's side;
- not reproduced: the interval lies wholly off it (it excludes every value the claim allows);
- inconclusive: anything else, and always when there is no estimate or no interval, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass(frozen=True)
class Side:
    """The claim's side: above `threshold`, or, given `upper`, in the claimed range [threshold, upper] or beyond."""
    threshold: float
    upper: float | None = None

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.upper is not None else value > self.threshold

    def __str__(self) -> str:
        if self.upper is not None:
            return f">= {self.threshold:g}, claimed {self.threshold:g}-{self.upper:g}"
        return f"> {self.threshold:g}"


def verdict(estimate: float | None, low: float | None, high: float | None, side: Side,
            why: str = "") -> tuple[str, str]:
    """(verdict, reason) of one claim; `why` says what is missing when the estimate or the interval is."""
    missing = f" ({why})" if why else ""
    if not _number(estimate):
        return INCONCLUSIVE, f"not measured{missing}"
    t = f"{side.threshold:g}"
    if not (_number(low) and _number(high)):
        where = "on" if side.holds(estimate) else "off"
        return INCONCLUSIVE, f"no interval{missing}; the estimate alone lies {where} the claim's side of {t}"
    if low > high:
        raise ValueError(f"interval [{low}, {high}] has its low end above its high end")
    ranged = side.upper is not None
    if side.holds(low):
        beyond = f"; the estimate is above the paper's range (up to {side.upper:g})" if (
            ranged and estimate > side.upper) else ""
        return REPRODUCED, f"interval wholly {'at or above' if ranged else 'above'} {t}{beyond}"
    if not side.holds(high):
        return NOT_REPRODUCED, f"interval wholly {'below' if ranged else 'at or below'} {t}"
    return INCONCLUSIVE, f"interval straddles {t}" + (" (the range's lower end)" if ranged else "")


def _number(x) -> bool:
    return x is not None and not math.isnan(x)
