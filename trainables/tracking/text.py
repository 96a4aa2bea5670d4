"""How a value is written for people, the same in the terminal, the MLflow description, the report and the model card."""

from __future__ import annotations

CELL_PAD = "&emsp;"  # an em space after each cell: MLflow's note view pads no table (`0.01` `0.9` would read `0.010.9`)


def fmt(value) -> str:
    """A float, or a logged param that is one, to 4 significant digits (0.02239, not 0.022390921945103375); None as
    an empty cell; anything else as str."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    try:
        return f"{float(text):.4g}" if "." in text or "e" in text.lower() else text
    except ValueError:
        return text


def markdown_table(header: list, rows: list[list], cell_end: str = "", bold=lambda row: False) -> list[str]:
    """A Markdown table's lines; `|` in a cell is escaped, each cell ends with `cell_end`, rows where `bold(row)`
    are bold."""
    def line(cells: list, strong: bool = False) -> str:
        cells = [f"**{c}**" if strong and str(c) else str(c) for c in cells]
        return "| " + " | ".join(c.replace("|", "\\|") + cell_end for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *[line(row, bold(row)) for row in rows]]
