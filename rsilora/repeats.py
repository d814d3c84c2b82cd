"""Repeat one configuration with several seeds: train, evaluate, report each metric's mean ± std.

The plan's stability bar: the standard deviation of RSIEval BLEU-4 over 5 runs stays below 0.02.
Output folder: ``seed-<s>/`` (a training run each, with its evaluation in ``seed-<s>/eval``) and
``repeats.json`` / ``repeats.md``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from rsilora.compare import Generation, evaluate_candidate, from_run
from rsilora.config import Config, config_from_dict, merge
from rsilora.evaluate import METRICS
from rsilora.files import atomic_write_json, atomic_write_text, prepare_output_dir
from rsilora.run import run_training

STABLE_BLEU4_STD = 0.02


def repeat(config: Config, seeds: list[int], data_dir: str, out: str | Path, settings: Generation,
           device: torch.device, overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` once per seed, evaluate each best adapter on ``data_dir``, aggregate."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"need at least two distinct seeds, got {seeds}")
    out = prepare_output_dir(out, overwrite=overwrite)
    runs = []
    for i, seed in enumerate(seeds):
        folder = out / f"seed-{seed}"
        seeded = config_from_dict(merge(config.to_dict(), {"train": {"seed": seed, "output_dir": str(folder)}}))
        print(f"== seed {seed} ==", flush=True)
        state = run_training(seeded)
        entry = evaluate_candidate(from_run(str(folder / "best"), seeded.model.name_or_path, "lora"), data_dir,
                                   folder / "eval", settings, device, verify_images=i == 0)  # images once
        runs.append({"seed": seed, "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
                     "scores": entry["scores"]})
    summary = {m: _stats([r["scores"][m] for r in runs]) for m in METRICS}
    result = {"seeds": seeds, "runs": runs, "summary": summary,
              "val_loss": _stats([r["best_val_loss"] for r in runs]),
              "stable": summary["BLEU-4"]["std"] < STABLE_BLEU4_STD}
    atomic_write_json(out / "repeats.json", result)
    atomic_write_text(out / "repeats.md", repeats_markdown(result))
    return result


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "min": min(values),
            "max": max(values)}


def repeats_markdown(result: dict[str, Any]) -> str:
    """Metric | mean ± std | min | max, then the stability verdict."""
    lines = [f"{len(result['seeds'])} runs, seeds {result['seeds']}\n", "| Metric | mean ± std | min | max |",
             "|---|---|---|---|"]
    rows = {**result["summary"], "best val loss": result["val_loss"]}
    lines += [f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} |" for m, s in rows.items()]
    verdict = "meets" if result["stable"] else "misses"
    lines.append(f"\nBLEU-4 std {result['summary']['BLEU-4']['std']:.4f} {verdict} the plan's stability bar "
                 f"(< {STABLE_BLEU4_STD}).")
    return "\n".join(lines) + "\n"
