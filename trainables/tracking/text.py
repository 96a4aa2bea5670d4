"""How a value is written for people, the same in the terminal, the MLflow description and the model card."""

from __future__ import annotations


def fmt(value) -> str:
    """A float to 4 significant digits, anything else as str (None prints as None)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
