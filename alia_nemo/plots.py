"""Plots written at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (empty when it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# DPO's reward margin and accuracy (train and validation): a second panel when a run logged them.
PREFERENCE_CURVES = (
    ("rewards/margin", "margin (train)"),
    ("eval_rewards/margin", "margin (validation)"),
    ("rewards/accuracy", "accuracy (train)"),
    ("eval_rewards/accuracy", "accuracy (validation)"),
)


def _curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``key`` against optimizer step (the last value logged at each step, as a resumed run logs some twice)."""
    return sorted({r["step"]: r[key] for r in rows if key in r}.items())


def plot_loss(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Training (and validation, when logged) loss against optimizer step, as a PNG.

    A DPO run gets a second panel below: reward margin and preference accuracy (train, and validation when
    logged), on two axes as the accuracy is a share in [0, 1] and the margin is unbounded.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    preference = any(key in r for r in rows for key, _ in PREFERENCE_CURVES)
    if preference:
        fig, (ax, pref) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = _curve(rows, key)
        if points:
            ax.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    if not preference:  # else the panel below carries the step axis
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)" if not preference else "loss (mean over pairs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        acc = pref.twinx()
        for key, label in PREFERENCE_CURVES:
            points = _curve(rows, key)
            if points:
                axis, colour = (pref, "tab:blue") if "margin" in key else (acc, "tab:orange")
                style = "--" if key.startswith("eval_") else "-"
                axis.plot(*zip(*points), style, color=colour, marker="." if style == "--" else None, label=label)
        pref.set_xlabel("optimizer step")
        pref.set_ylabel("reward margin (chosen - rejected)")
        acc.set_ylabel("preference accuracy")
        acc.set_ylim(-0.02, 1.02)
        pref.grid(alpha=0.3)
        lines = [*pref.get_legend_handles_labels()[0], *acc.get_legend_handles_labels()[0]]
        pref.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
