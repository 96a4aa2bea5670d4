"""A search's time budget: `90s`, `30m`, `1.5h` or a plain number of seconds, as the user writes it.

The budget goes to Ray Tune as `TuneConfig(time_budget_s=...)`: Ray proposes trials until it is spent, then stops
every running trial where it is (mid-epoch). Those trials are "cut by budget" (trainables.tracking.ranking), not stopped by ASHA.
Whether the budget was spent, over every run of a resumed search, is decided once: trainables.tracking.state.BudgetClock.
"""

from __future__ import annotations

import re

UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")


def parse_duration(value, what: str = "time budget") -> float:
    """Seconds in `value` (`90s`, `30m`, `1.5h`, `45`, or a YAML number); ValueError naming `what` and the fix
    otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip().lower())
        if match is None:
            raise ValueError(f"{what} {value!r} is not a duration; write e.g. 90s, 30m, 1.5h or seconds (600)")
        seconds = float(match.group(1)) * UNITS[match.group(2)]
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{what} {value!r} must be more than 0 seconds; write e.g. 90s, 30m or 1.5h")
    return seconds


def format_duration(seconds: float) -> str:
    """`45s`, `4m`, `1.5h`: the unit a user would have written."""
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    if seconds >= 60:
        return f"{seconds / 60:.3g}m"
    return f"{seconds:.3g}s"


def budget_line(budget_s: float, used_s: float) -> str:
    """`time budget: 4m, used 4.02m (100 %)`: printed at the end of a search with a budget."""
    return f"time budget: {format_duration(budget_s)}, used {format_duration(used_s)} ({100 * used_s / budget_s:.0f} %)"
