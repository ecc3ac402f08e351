"""Tables for the terminal and plots of anytime curves (error against cumulative cost)."""

from __future__ import annotations

import statistics
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


def plot_series(
    series: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    xlabel: str = "cumulative multiply-adds per image (millions)",
    ylabel: str = "validation error (%)",
    title: str = "",
    log_x: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
) -> Path:
    """Curves with their own x values (multiply-adds, shown in millions): each series is a dict
    of label, x, y and optionally step=True (a staircase, each value held until the next point;
    with extend_to=X the last one is held up to X) and any matplotlib line keyword (linestyle,
    color, marker ...). `hlines`: (y, label) reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for s in series:
        style = {k: v for k, v in s.items() if k not in ("label", "x", "y", "step", "extend_to")}
        style.setdefault("marker", "o")
        x, y = [v / 1e6 for v in s["x"]], list(s["y"])
        if s.get("step"):
            marker = style.pop("marker")
            size = style.pop("markersize", 6)
            if s.get("extend_to") is not None and s["extend_to"] / 1e6 > x[-1]:
                x, y = [*x, s["extend_to"] / 1e6], [*y, y[-1]]
            (line,) = ax.step(x, y, where="post", label=s["label"], **style)
            if marker:  # markers only on the real points, not on the held end
                ax.plot(x[: len(s["x"])], y[: len(s["x"])], linestyle="", marker=marker,
                        markersize=size, color=line.get_color(), zorder=line.get_zorder())
        else:
            ax.plot(x, y, label=s["label"], **style)
    for y, label in hlines:
        ax.axhline(y, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (1, y), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=8, color="grey")
    if log_x:
        ax.set_xscale("log")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # 0.5, 2, 30 rather than 5x10^-1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ratio_bars(
    values: dict[str, Sequence[float]],
    path: str | Path,
    *,
    goal: float,
    goal_label: str,
    xlabel: str,
    title: str = "",
) -> Path:
    """One horizontal bar per name at the median of its values (one per round; each shown as a
    tick when there are several), against a dashed goal line. For benchmark ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)[::-1]  # the first name on top
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=120)
    ax.barh(names, [statistics.median(values[n]) for n in names], alpha=0.8)
    for i, name in enumerate(names):
        if len(values[name]) > 1:
            ax.plot(values[name], [i] * len(values[name]), "k|", markersize=12)
    ax.axvline(goal, color="tab:red", linestyle="--")
    ax.annotate(goal_label, (goal, 1.0), xycoords=("data", "axes fraction"), ha="center",
                va="bottom", fontsize=8, color="tab:red")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=8, pad=14)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_duration(seconds: float) -> str:
    """`1h05m` or `4m09s`: an ETA or an elapsed time in a log line."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
