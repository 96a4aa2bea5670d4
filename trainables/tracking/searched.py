"""Which config keys a search varies: its `params`, and `variant` when it has `variants`.

One list for every place that shows a trial's searched values: the progress lines and the end-of-search table
(search_spaces, tune.py, from the loaded space), the leaderboard, the report and the model card (analysis, from the
space logged with the search). Both pass the space as a mapping, as YAML states it (`SearchSpace.as_dict()`).
"""

from __future__ import annotations

VARIANT = "variant"  # the trial config key naming the chosen variant (trainables.ray_trainable expands it)


def searched_keys(space: dict) -> list[str]:
    """The searched config keys, in the space's order: every `params` key, then `variant` if there are variants."""
    return list(space.get("params") or {}) + ([VARIANT] if space.get("variants") else [])
