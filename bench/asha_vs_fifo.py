"""Stage 1 under ASHA and under FIFO, side by side: trial-epochs, wall time, best val loss.

Both runs search the same space (stage 1, space ``bench``: 18 configurations x 10 epochs, early
stopping off) on the same synthetic data and tiny model, one after the other on one local Ray
instance. Goal: ASHA needs <= 0.30 of FIFO's trial-epochs and finds a best val loss within 1 %.
Also prints the per-trial start-up cost (time from the trainable's start to its first report,
minus that epoch's own time) — worker start-up before the trainable runs is not included.

    .venv/bin/python bench/asha_vs_fifo.py [--train-images 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rsilora import results
from rsilora.config import load_config
from rsilora.model import quiet_libraries
from rsilora.synth import write_synthetic_datasets
from rsilora.tiny import write_tiny_model
from rsilora.tune import run_stage


def run(scheduler: str, root: Path, synth, model_dir: Path, space: str, reduction_factor: float) -> dict:
    storage = root / "storage"
    config = load_config(overrides=[
        f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
        f"data.split_dir={root / 'splits'}", f"model.name_or_path={model_dir}", f"tune.storage={storage}",
        f"tune.scheduler={scheduler}", f"tune.reduction_factor={reduction_factor}", "tune.cpus_per_trial=1",
        "train.progress=false",
    ], preset="tiny", base_dir=root)
    start = time.perf_counter()
    experiment, _ = run_stage("stage1", config, space, name=f"bench-{scheduler}")
    wall = time.perf_counter() - start
    trials = results.read_trials(experiment)
    startup = [t_first for t in trials if (t_first := _startup(experiment, t.trial_dir)) is not None]
    return {"trials": len(trials), "trial_epochs": sum(t.epochs_run for t in trials), "wall_s": wall,
            "best_val_loss": results.best(experiment).val_loss, "startup_s_median": statistics.median(startup)}


def _startup(experiment: str, trial_dir: str) -> float | None:
    rows = [json.loads(line) for line in Path(trial_dir, "result.json").read_text().splitlines() if line]
    return rows[0]["time_total_s"] - rows[0]["epoch_time_s"] if rows else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--space", default="bench")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep the top 1/rf at each rung")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_libraries()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth = write_synthetic_datasets(root / "data", args.train_images, 4, image_size=128)
        model_dir = write_tiny_model(root / "tiny")
        figures = {s: run(s, root, synth, model_dir, args.space, args.reduction_factor) for s in ("asha", "fifo")}
    asha, fifo = figures["asha"], figures["fifo"]
    ratios = {"trial_epochs": asha["trial_epochs"] / fifo["trial_epochs"], "wall_time": asha["wall_s"] / fifo["wall_s"],
              "best_val_loss": asha["best_val_loss"] / fifo["best_val_loss"]}
    print(f"\n{'':<10}{'trials':>8}{'trial-epochs':>14}{'wall s':>9}{'best val':>10}{'start-up s':>12}")
    for name, f in figures.items():
        print(f"{name:<10}{f['trials']:>8}{f['trial_epochs']:>14}{f['wall_s']:>9.1f}{f['best_val_loss']:>10.4f}"
              f"{f['startup_s_median']:>12.2f}")
    print(f"ASHA (grace 1, reduction factor {args.reduction_factor:g}, max_t 10) / FIFO: trial-epochs {ratios['trial_epochs']:.2f} (goal <= 0.30), wall time {ratios['wall_time']:.2f}, "
          f"best val loss {ratios['best_val_loss']:.4f} (goal within 1 %: <= 1.01)")
    if args.json:
        args.json.write_text(json.dumps({"asha_vs_fifo": figures, "asha_fifo_ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
