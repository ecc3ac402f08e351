"""Tables for the terminal and plots of anytime curves (error against cumulative cost)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table; floats get 3 significant decimals, ints thousands separators."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plot_anytime_curve(
    macs: Sequence[float],
    curves: dict[str, Sequence[float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Error (%) of each exit against cumulative multiply-adds; one line per named curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works on a headless node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, errors in curves.items():
        ax.plot([m / 1e6 for m in macs], errors, marker="o", label=label)
    ax.set_xlabel("cumulative multiply-adds per image (millions)")
    ax.set_ylabel("validation error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
