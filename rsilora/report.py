"""Tables and a one-page report from saved results: a Ray Tune experiment and/or an evaluation.

Only reads what earlier steps wrote (no model, no Ray): the experiment through :mod:`rsilora.results`
and the evaluation folder's ``comparison.json`` + ``<model>/predictions.json``. The figures are
drawn by :mod:`rsilora.plots`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rsilora import results
from rsilora.config import config_from_dict, to_yaml
from rsilora.files import csv_text, prepare_output_dir, replace_dir
from rsilora.plots import (BAR_METRICS, DASH, fmt_num, fmt_params, fmt_time, plot_baseline_comparison,
                           plot_efficiency_tradeoff, plot_loss_curves, plot_samples, ranked, trial_label)
from rsilora.results import TrialSummary

PACKAGES = ("torch", "torchvision", "transformers", "peft", "ray", "optuna", "pycocoevalcap", "matplotlib",
            "rsilora")


# --- Tables ---


def config_table(trials: list[TrialSummary], comparison: dict | None) -> list[dict]:
    """The plan's configuration table: one row per trial (best first), then non-trial models."""
    models = (comparison or {}).get("models", [])
    by_trial = {m["trial_id"]: m for m in models if m.get("trial_id")}
    rows = []
    for t in ranked(trials):
        label = f"LoRA {trial_label(t.overrides)}" if all(k.startswith("lora.") for k in t.overrides) \
            else trial_label(t.overrides)
        if t.status != "completed":
            label += f" ({t.status}, {t.epochs_run}/{t.planned_epochs} epochs)"
        model = by_trial.get(t.trial_id)
        rows.append(_row(label, t.train_loss_at_best, t.best_val_loss, model, t.trainable_params, t.time_s))
    ids = {t.trial_id for t in trials}
    for m in models:
        if m.get("trial_id") not in ids:  # zero-shot, full fine-tuning, or a trial of another experiment
            rows.append(_row(m["label"], None, None, m, (m.get("parameters") or {}).get("trainable"),
                             m.get("training_time_s")))
    return rows


def _row(label: str, train: float | None, val: float | None, model: dict | None, params: int | None,
         seconds: float | None) -> dict:
    bleu = model["scores"].get("BLEU-4") if model else None
    return {"Configuration": label, "Train loss": fmt_num(train), "Val loss": fmt_num(val),
            "RSIEval BLEU-4": fmt_num(bleu, 3), "Parameters": fmt_params(params), "Training time": fmt_time(seconds)}


def markdown_table(rows: list[dict]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (columns in first-seen key order)."""
    if not rows:
        return "_(no rows)_\n"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(DASH if row.get(k) is None else row[k]).replace("|", "\\|").replace("\n", " ") for k in keys]
             for row in rows]
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join(" --- " for _ in keys) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def load_comparison(eval_dir: str | Path) -> dict:
    """Read ``<eval_dir>/comparison.json`` and check the fields the report uses."""
    location = Path(eval_dir) / "comparison.json"
    if not location.is_file():
        raise FileNotFoundError(f"{location}: no comparison.json in the evaluation folder")
    try:
        comparison = json.loads(location.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{location}: not valid JSON ({err})") from err
    problems = []
    models = comparison.get("models") if isinstance(comparison, dict) else None
    if not isinstance(models, list) or not models:
        problems.append('"models" is missing or not a non-empty list')
    for i, model in enumerate(models or []):
        if not isinstance(model, dict):
            problems.append(f"models[{i}] is not an object")
            continue
        name = model.get("key", f"models[{i}]")
        problems += [f'{name}: "{k}" missing' for k in ("key", "label", "scores") if k not in model]
        scores = model.get("scores") or {}
        problems += [f'{name}: scores["{m}"] missing or not a number' for m in BAR_METRICS
                     if not isinstance(scores.get(m), (int, float))]
    if problems:
        raise ValueError(f"{location}: " + "; ".join(problems))
    return comparison


# --- The report ---


def write_report(experiment: str | Path | None, eval_dir: str | Path | None, out: str | Path,
                 overwrite: bool = False) -> Path:
    """Write the figures, tables and ``report.md`` into ``out``; returns the path of report.md.

    Inputs are read and checked before ``out`` is touched; everything is built in a temporary
    sibling folder that replaces ``out`` only when complete.
    """
    if experiment is None and eval_dir is None:
        raise ValueError("write_report needs an experiment folder, an evaluation folder, or both")
    out = Path(out).resolve()
    for source in (experiment, eval_dir):
        if source is not None and "://" not in str(source) and out in [Path(source).resolve(),
                                                                       *Path(source).resolve().parents]:
            raise ValueError(f"{out} contains the input {source}: writing the report there would delete it; "
                             "choose another output folder")
    trials = results.read_trials(experiment) if experiment is not None else []
    comparison = load_comparison(eval_dir) if eval_dir is not None else None
    prepare_output_dir(out, overwrite=overwrite)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the report from other users of a shared results folder
    try:
        text = _build(staging, out, experiment, trials, eval_dir, comparison)
        (staging / "report.md").write_text(text, encoding="utf-8")  # atomic: staging is renamed
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "report.md"


def _build(staging: Path, out: Path, experiment, trials, eval_dir, comparison) -> str:
    md = ["# rsilora report", "",
          f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from "
          + ", ".join(f"`{s}`" for s in (experiment, eval_dir) if s is not None) + ".", ""]
    if comparison is not None:
        md += _evaluation_section(staging, out, Path(eval_dir), comparison)
    if experiment is not None:
        md += _experiment_section(staging, experiment, trials, comparison)
    md += _environment_section()
    return "\n".join(md) + "\n"


def _evaluation_section(staging: Path, out: Path, eval_dir: Path, comparison: dict) -> list[str]:
    plot_baseline_comparison(comparison, staging / "baseline_comparison.png")
    plot_efficiency_tradeoff(comparison, staging / "efficiency_tradeoff.png")
    plot_samples(comparison, eval_dir, staging / "samples.png")
    source = Path(os.path.relpath(eval_dir.resolve(), out))
    md = ["## Evaluation on RSIEval", "",
          f"{comparison.get('images', '?')} images from `{comparison.get('data', '?')}`; source: "
          f"[comparison.md]({(source / 'comparison.md').as_posix()}), "
          f"[comparison.json]({(source / 'comparison.json').as_posix()}).", ""]
    table = eval_dir / "comparison.md"
    if table.is_file():  # the evaluation's own table, its headings moved below this section's
        md += [("##" + line) if line.startswith("#") else line
               for line in table.read_text(encoding="utf-8").strip().splitlines()]
    else:
        md.append(f"(`{table}` not found)")
    md += ["", *_paired_lines(comparison), "### Efficiency", "", *_efficiency_lines(comparison), "",
           "![Baseline comparison](baseline_comparison.png)", "",
           "![Efficiency trade-off](efficiency_tradeoff.png)", "",
           "### Samples", "", "![Qualitative samples](samples.png)", ""]
    return md


def _efficiency_lines(comparison: dict) -> list[str]:
    eff = comparison.get("efficiency") or {}
    names = (("trainable_ratio", "Trainable parameters", 0.01), ("training_time_ratio", "Training time", 0.3),
             ("memory_ratio", "Peak training memory", 0.5))  # goals: the plan's "expected results"
    return [f"- {text}, LoRA / full fine-tuning: "
            + (f"{eff[key]:.3g} (plan's goal ≤ {goal:g})" if eff.get(key) is not None
               else "not measured (give `rsilora compare` a full fine-tuning run with --full)")
            for key, text, goal in names]


def _paired_lines(comparison: dict) -> list[str]:
    lines = []
    for p in comparison.get("paired") or []:
        ci = p.get("ci") or [None, None]
        lines.append(f"- {p['metric']}: {p['a']} − {p['b']} = {p['difference']:+.3f} "
                     f"(CI {fmt_num(ci[0], 3)} to {fmt_num(ci[1], 3)}; "
                     f"{p['a']} better in {p.get('a_better_share', float('nan')):.1%} of resamples)")
    return ["### Paired bootstrap, every metric", "", *lines, ""] if lines else []


def _experiment_section(staging: Path, experiment, trials: list[TrialSummary], comparison: dict | None) -> list[str]:
    stage = results.read_stage(experiment)
    plot_loss_curves(trials, staging / "loss_curves.png")
    rows = config_table(trials, comparison)
    (staging / "config_table.md").write_text(markdown_table(rows), encoding="utf-8")
    (staging / "config_table.csv").write_text(csv_text(rows), encoding="utf-8")
    origin = stage.get("previous")
    md = ["## Search", "",
          f"- stage: {stage.get('stage')}, space: {stage.get('space')}, search: {stage.get('search')}, "
          f"scheduler: {stage.get('scheduler')} (max_t {stage.get('max_t')}), trials: {len(trials)}",
          "- starts from: " + (f"best trial {origin['trial_id']} of `{origin['experiment']}` (val loss "
                               f"{origin['val_loss']:.4f} at epoch {origin['epoch']}; {trial_label(origin['overrides'])})"
                               if origin else "the given config (no previous stage)"),
          "", "![Loss curves](loss_curves.png)", "",
          "### Configurations", "", "Train/val loss at each trial's best epoch "
          "([config_table.md](config_table.md), [config_table.csv](config_table.csv)).", "",
          markdown_table(rows)]
    if any(t.best_val_loss is not None for t in trials):
        top = results.best(experiment, trials)
        md += ["### Best trial", "",
               f"Trial {top.trial_id}: val loss {top.val_loss:.4f} at epoch {top.epoch}; searched values: "
               f"{trial_label(top.overrides)}; checkpoint: `{top.checkpoint}`.", "", "```yaml",
               to_yaml(config_from_dict(top.config), comments=False).rstrip(), "```", ""]
    return md + _split_lines((stage.get("base_config") or {}).get("data", {}))


def _split_lines(data: dict) -> list[str]:
    by, seed, fraction = data.get("split_by"), data.get("split_seed"), data.get("val_fraction")
    root = data.get("split_dir") or str(Path(data.get("rsicap_dir") or ".", "splits"))
    meta_file = Path(root, f"{by}-val{fraction:g}-seed{seed}", "split.json") if fraction is not None else None
    sizes = "sizes unknown (split.json not found)"
    if meta_file is not None and meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        sizes = f"{meta.get('train_images')} train / {meta.get('val_images')} val images"
    return ["### Split", "", f"RSICap split by {by}, seed {seed}, val fraction {fraction}: {sizes} "
            f"(`{meta_file.parent if meta_file else root}`). RSIEval is the test set.", ""]


def _environment_section() -> list[str]:
    rows = [{"Package": name, "Version": _version(name)} for name in PACKAGES]
    return ["## Environment", "", f"git commit: `{git_commit()}`", "", markdown_table(rows)]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """HEAD of the git checkout around the working directory or the rsilora sources, else 'unknown'."""
    for folder in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return "unknown"
