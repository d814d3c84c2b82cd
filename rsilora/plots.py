"""Figures from saved results, and the small formatters their labels and the report's tables share.

Figures are drawn on plain :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot), so
importing this module never changes the backend of a notebook or script, and every PNG is exactly
figsize x 300 dpi. Inputs are what :mod:`rsilora.results` reads from an experiment and the
evaluation folder's ``comparison.json`` (see :func:`rsilora.report.load_comparison`).
"""

from __future__ import annotations

import json
import math
import random
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from rsilora.results import TrialSummary

DPI = 300
MAX_LOSS_PANELS = 24
BAR_METRICS = ("BLEU-4", "CIDEr", "ROUGE-L")
BASELINE_FIGSIZE = (15.0, 5.5)
EFFICIENCY_FIGSIZE = (10.0, 7.5)
DASH = "—"
# Sizes in inches are multiples of 1/4 so that figsize x 300 dpi is an exact pixel count.
_PANEL = (4.5, 3.25)
_SAMPLE_WRAP, _SAMPLE_LINES, _SAMPLE_FONT = 140, 4, 9.0
_SHORT = {"lora.r": "r", "lora.alpha": "α", "lora.dropout": "dropout"}

# --- Small formatters ---


def fmt_params(n: int | None) -> str:
    """18874368 -> '18.87 M', 4022969088 -> '4.02 B'."""
    if n is None:
        return DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):  # as rsilora.model.format_count, without torch
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def fmt_time(seconds: float | None) -> str:
    """9720 -> '2 h 42 min', 785 -> '13 min 5 s', 9.4 -> '9.4 s'."""
    if seconds is None:
        return DASH
    if seconds >= 3600:
        hours, rest = divmod(round(seconds), 3600)
        return f"{hours} h {rest // 60:02d} min"
    if seconds >= 60:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def fmt_num(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals, or a dash for a missing value."""
    return DASH if value is None else f"{value:.{digits}f}"


def trial_label(overrides: dict[str, Any]) -> str:
    """'r=16, α=32, dropout=0.1' for LoRA keys; other keys as their last part, e.g. 'lr=3e-05'."""
    order = [k for k in _SHORT if k in overrides] + sorted(k for k in overrides if k not in _SHORT)
    value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ", ".join(f"{_SHORT.get(k, k.rpartition('.')[2])}={value(overrides[k])}" for k in order) or "base config"


def ranked(trials: list[TrialSummary]) -> list[TrialSummary]:
    """Best val loss first; trials that never reported last."""
    return sorted(trials, key=lambda t: (t.best_val_loss is None, t.best_val_loss or 0.0, t.trial_id))


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays figsize x DPI
    return path


def _colours(n: int) -> list:
    return [colormaps["tab10"](i % 10) for i in range(n)]


# --- Loss curves ---


def loss_curves_figsize(panels: int) -> tuple[float, float]:
    """Figure size of :func:`plot_loss_curves` for ``panels`` subplots (up to 3 columns)."""
    cols, rows = min(3, max(panels, 1)), math.ceil(max(panels, 1) / 3)
    return (_PANEL[0] * cols + 0.5, _PANEL[1] * rows + 0.75)


def plot_loss_curves(trials: list[TrialSummary], path: Path) -> Path:
    """Train and val loss per epoch, one panel per trial (best 24 by val loss), best epoch marked."""
    ordered = ranked(trials)
    shown = ordered[:MAX_LOSS_PANELS]
    fig = Figure(figsize=loss_curves_figsize(len(shown)), layout="constrained")
    cols = min(3, max(len(shown), 1))
    title = "Train / val loss per configuration"
    if len(ordered) > len(shown):
        title += f" (best {len(shown)} of {len(ordered)} by val loss)"
    fig.suptitle(title if shown else "No trials in this experiment", fontsize=13)
    for i, trial in enumerate(shown):
        _loss_panel(fig.add_subplot(math.ceil(len(shown) / cols), cols, i + 1), trial)
    if shown:
        handles = [Line2D([], [], color="tab:blue", marker="o", label="train loss"),
                   Line2D([], [], color="tab:red", marker="s", label="val loss"),
                   Line2D([], [], color="gray", linestyle="--", label="best epoch")]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return _save(fig, path)


def _loss_panel(ax, trial: TrialSummary) -> None:
    rows = [r for r in trial.history if "epoch" in r]
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r.get("train_loss", np.nan) for r in rows], "-o", color="tab:blue", markersize=4)
    ax.plot(epochs, [r.get("val_loss", np.nan) for r in rows], "-s", color="tab:red", markersize=4)
    if trial.best_epoch is not None:
        ax.axvline(trial.best_epoch, color="gray", linestyle="--", alpha=0.8)
    if rows and trial.epochs_run < trial.planned_epochs:  # shade the epochs the trial never ran
        ax.axvspan(trial.epochs_run + 0.5, trial.planned_epochs + 0.5, color="0.9", zorder=0)
    note = f"best val {trial.best_val_loss:.4f} @ epoch {trial.best_epoch}" if rows else "no epoch reported"
    if trial.status != "completed":
        note += f" ({trial.status}, {trial.epochs_run}/{trial.planned_epochs} epochs)"
    colour = "tab:orange" if trial.status == "stopped by ASHA" else "black"
    ax.set_title(f"{trial_label(trial.overrides)}\n{note}", fontsize=8.5, color=colour)
    ax.set(xlim=(0.5, max(trial.planned_epochs, max(epochs, default=1)) + 0.5), xlabel="epoch", ylabel="loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


# --- Comparison figures ---


def plot_baseline_comparison(comparison: dict, path: Path) -> Path:
    """BLEU-4, CIDEr and ROUGE-L per model: bars with value labels and bootstrap CI whiskers."""
    models = comparison["models"]
    colours = _colours(len(models))
    fig = Figure(figsize=BASELINE_FIGSIZE, layout="constrained")
    level = (comparison.get("bootstrap") or {}).get("confidence") or 0.95
    fig.suptitle(f"RSIEval caption metrics ({comparison.get('images', '?')} images; whiskers: {level:.0%} "
                 "bootstrap CI)", fontsize=12)
    axes = fig.subplots(1, len(BAR_METRICS))
    x = np.arange(len(models))
    for ax, metric in zip(axes, BAR_METRICS):
        values = np.array([m["scores"][metric] for m in models], dtype=float)
        lows, highs = _ci_bounds(models, metric, values)
        bars = ax.bar(x, values, color=colours, width=0.65)
        has_ci = ~np.isnan(lows)
        if has_ci.any():  # whiskers only for models whose CI was computed
            ax.errorbar(x[has_ci], values[has_ci], yerr=[values[has_ci] - lows[has_ci], highs[has_ci] - values[has_ci]],
                        fmt="none", ecolor="black", capsize=5, linewidth=1.2)
        tops = np.where(has_ci, highs, values)
        span = max(float(np.nanmax(tops)), 1e-9)
        for bar, value, top in zip(bars, values, tops):
            ax.text(bar.get_x() + bar.get_width() / 2, top + 0.02 * span, f"{value:.3f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set(ylim=(0, span * 1.2), title=metric, ylabel=metric)
        ax.set_xticks(x, [m["label"] for m in models], rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _ci_bounds(models: list[dict], metric: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lows, highs = np.full(len(models), np.nan), np.full(len(models), np.nan)
    for i, model in enumerate(models):
        ci = (model.get("ci") or {}).get(metric)
        if ci and len(ci) == 2 and None not in ci:
            lows[i], highs[i] = min(ci[0], values[i]), max(ci[1], values[i])
    return lows, highs


def _marker_area(trainable: int | None) -> float:
    # log scale: 0.1 M -> 40 pt², 18.9 M -> ~190, 4 B -> ~970, so LoRA and full FT both stay visible
    return 40.0 * 2 ** (math.log10(max(trainable or 0, 1e5)) - 5)


def plot_efficiency_tradeoff(comparison: dict, path: Path) -> Path:
    """Training time (hours) vs BLEU-4; marker area grows with log(trainable parameters)."""
    models = comparison["models"]
    fig = Figure(figsize=EFFICIENCY_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    points = []
    for i, (model, colour) in enumerate(zip(models, _colours(len(models)))):
        x = (model.get("training_time_s") or 0.0) / 3600  # no training (zero-shot) sits at x=0
        y = model["scores"]["BLEU-4"]
        trainable = (model.get("parameters") or {}).get("trainable")
        ci = (model.get("ci") or {}).get("BLEU-4")
        if ci and None not in ci:
            ax.errorbar([x], [y], yerr=[[y - min(ci[0], y)], [max(ci[1], y) - y]], fmt="none", ecolor=colour,
                        capsize=4, alpha=0.7)
        area = _marker_area(trainable)
        ax.scatter([x], [y], s=area, color=colour, alpha=0.7, edgecolor="black", zorder=3)
        # right of the marker's edge; alternately above and below, as zero-shot models share x=0
        note = f"{fmt_params(trainable)} trainable" if trainable else "no training"
        ax.annotate(f"{model['label']}\n{note}", (x, y), xytext=(math.sqrt(area / math.pi) + 4, 10 - 20 * (i % 2)),
                    textcoords="offset points", fontsize=8, va="center", zorder=4,
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        points.append((x, y))
    front = _pareto(points)
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="gray", alpha=0.6, zorder=1, label="Pareto front")
    for n, text in ((10**7, "10 M"), (10**8, "100 M"), (10**9, "1 B"), (4 * 10**9, "4 B")):  # size key
        ax.scatter([], [], s=_marker_area(n), color="lightgray", edgecolor="black", label=text)
    ax.legend(title="trainable parameters", loc="lower right", fontsize=8, labelspacing=2.2, borderpad=1.4,
              handletextpad=1.5)
    xmax = max((p[0] for p in points), default=0.0) or 1.0  # only zero-shot models: an hour's axis
    ax.set(xlim=(-0.05 * xmax, xmax * 1.35),  # room for the labels right of the points
           xlabel="Training time (hours)", ylabel="RSIEval BLEU-4", title="Efficiency-performance trade-off")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


# --- Qualitative samples ---


def samples_figsize(n: int, models: int) -> tuple[float, float]:
    """Figure size of :func:`plot_samples` for ``n`` images and ``models`` captions per image."""
    lines = (models + 1) * (_SAMPLE_LINES + 1.4)  # header + capped caption + gap per caption
    row = max(2.75, math.ceil(lines * _SAMPLE_FONT * 1.3 / 72 * 4) / 4 + 0.25)
    return (14.0, row * max(n, 1) + 0.5)


def plot_samples(comparison: dict, eval_dir: Path, path: Path, n: int = 4, seed: int = 0) -> Path:
    """``n`` seeded random images with the reference caption and every model's caption."""
    models = comparison["models"]
    predictions = [_predictions(Path(eval_dir), m) for m in models]
    common = sorted(set.intersection(*(set(p) for p in predictions))) if predictions else []
    chosen = random.Random(seed).sample(common, min(n, len(common)))
    fig = Figure(figsize=samples_figsize(len(chosen), len(models)), layout="constrained")
    fig.suptitle("Qualitative samples (RSIEval)" if chosen else "No image has a prediction from every model")
    grid = fig.add_gridspec(max(len(chosen), 1), 2, width_ratios=[1, 3.6])
    for row, filename in enumerate(chosen):
        _thumbnail(fig.add_subplot(grid[row, 0]), comparison.get("data"), filename)
        ax = fig.add_subplot(grid[row, 1])
        ax.axis("off")
        reference = next((p[filename].get("reference") for p in predictions if p[filename].get("reference")), "")
        blocks = [("Reference", reference, "black")]
        blocks += [(m["label"], p[filename].get("prediction", ""), c)
                   for m, p, c in zip(models, predictions, _colours(len(models)))]
        _caption_blocks(ax, blocks)
    return _save(fig, path)


def _predictions(eval_dir: Path, model: dict) -> dict[str, dict]:
    location = eval_dir / (model.get("predictions") or f"{model['key']}/predictions.json")
    try:
        entries = json.loads(location.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{location}: cannot read predictions of {model['key']}: {err}") from err
    return {e["filename"]: e for e in entries if isinstance(e, dict) and "filename" in e}


def _thumbnail(ax, data: str | None, filename: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(filename, fontsize=7)
    try:
        if not data:
            raise FileNotFoundError(filename)
        with Image.open(Path(data, "images", filename)) as img:
            img = img.convert("RGB")
            img.thumbnail((512, 512))
            ax.imshow(np.asarray(img))
    except OSError:  # the dataset may not be on this machine: the captions are still worth showing
        ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=8, transform=ax.transAxes)


def _caption_blocks(ax, blocks: list[tuple[str, str, Any]]) -> None:
    line = _SAMPLE_FONT * 1.3  # points
    offset = 0.0
    for name, text, colour in blocks:
        wrapped = textwrap.wrap(" ".join(str(text).split()), _SAMPLE_WRAP) or ["(empty)"]
        if len(wrapped) > _SAMPLE_LINES:
            wrapped = wrapped[:_SAMPLE_LINES - 1] + [wrapped[_SAMPLE_LINES - 1][:_SAMPLE_WRAP - 2] + " …"]
        ax.annotate(name, (0, 1), xycoords="axes fraction", xytext=(0, -offset), textcoords="offset points",
                    fontsize=_SAMPLE_FONT, fontweight="bold", color=colour, va="top")
        ax.annotate("\n".join(wrapped), (0, 1), xycoords="axes fraction", xytext=(0, -offset - line),
                    textcoords="offset points", fontsize=_SAMPLE_FONT, va="top", linespacing=1.15)
        offset += line * (len(wrapped) + 1.4)
