"""Stage 1 under ASHA and under FIFO, side by side: trial-epochs, wall time, best val loss.

Both runs search the same space (stage 1, space ``bench``: 48 configurations, as many as the
full stage 1 grid, x 10 epochs, early stopping off) on the same synthetic data and tiny model, one
after the other on one local Ray instance. Goal: ASHA needs <= 0.30 of FIFO's trial-epochs and
finds a best val loss within 1 %. Also prints the per-trial start-up cost (time from the
trainable's start to its first report, minus that epoch's own time) — worker start-up before the
trainable runs is not included.

Asynchronous ASHA's figure depends on the order trials start in (the first trials at a rung are
promoted unconditionally), and one run is one order. So the script also replays Ray's own
ASHAScheduler over the FIFO run's recorded curves (every epoch's val loss and time): in Ray's
listed grid order, in the seeded order the real ASHA run used (a check of the replay), and in 200
other seeded orders (the spread a user should expect).

    .venv/bin/python bench/asha_vs_fifo.py [--train-images 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from ray.tune import grid_search
from ray.tune.search.variant_generator import generate_variants

from rsilora import results
from rsilora.config import load_config
from rsilora.model import quiet_libraries
from rsilora.synth import write_synthetic_datasets
from rsilora.tiny import write_tiny_model
from rsilora.tune import load_space, run_stage


def run(scheduler: str, root: Path, synth, model_dir: Path, space: str, reduction_factor: float) -> tuple[dict, str]:
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
            "best_val_loss": results.best(experiment).val_loss, "startup_s_median": statistics.median(startup),
            "seed": config.train.seed}, experiment


def recorded_curves(experiment: str) -> dict[tuple, list[tuple[float, float]]]:
    """Each trial's (val_loss, epoch_time_s) per epoch, keyed by its sorted parameters."""
    curves = {}
    for trial in results.read_trials(experiment):
        curves[tuple(sorted(trial.overrides.items()))] = [(r["val_loss"], r["epoch_time_s"]) for r in trial.history]
    return curves


def replay_asha(curves: list[list[tuple[float, float]]], concurrency: int, max_t: int, grace: int,
                reduction_factor: float) -> tuple[int, float]:
    """Ray's ASHAScheduler fed recorded curves, trials started in list order, ``concurrency`` at a
    time, each epoch taking its recorded time. Returns (trial-epochs run, best val loss seen)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(time_attr="epoch", metric="val_loss", mode="min", max_t=max_t,
                              grace_period=grace, reduction_factor=reduction_factor)
    events: list[tuple[float, int, int]] = []  # (finish time, trial index, epoch), a min-heap
    waiting, epochs, best = list(range(len(curves))), 0, float("inf")

    def start(now: float) -> None:
        if waiting:
            i = waiting.pop(0)
            scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(i)))
            heapq.heappush(events, (now + curves[i][0][1], i, 1))

    for _ in range(concurrency):
        start(0.0)
    while events:
        now, i, epoch = heapq.heappop(events)
        loss = curves[i][epoch - 1][0]
        epochs, best = epochs + 1, min(best, loss)
        action = scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(i)), {"epoch": epoch, "val_loss": loss})
        if action == TrialScheduler.CONTINUE and epoch < len(curves[i]):
            heapq.heappush(events, (now + curves[i][epoch][1], i, epoch + 1))
        else:
            start(now)
    return epochs, best


def replays(experiment: str, space_name: str, seed: int, concurrency: int, reduction_factor: float) -> dict:
    """Trial-epoch ratio and best-loss ratio of ASHA replayed in the listed, the real run's and 200 seeded orders."""
    space = load_space("stage1", space_name)
    curves = recorded_curves(experiment)
    fifo_epochs = sum(len(c) for c in curves.values())
    fifo_best = min(loss for c in curves.values() for loss, _ in c)
    max_t = max(len(c) for c in curves.values())

    def replay(points: list[dict]) -> tuple[float, float]:
        ordered = [curves[tuple(sorted(p.items()))] for p in points]
        epochs, best = replay_asha(ordered, concurrency, max_t, 1, reduction_factor)
        return epochs / fifo_epochs, best / fifo_best

    listed = [dict(v) for _, v in generate_variants({k: grid_search(v) for k, v in space.grid.items()})]
    shuffled = [replay(space.grid_points(seed=s)) for s in range(1000, 1200)]
    deciles = statistics.quantiles([r for r, _ in shuffled], n=10)
    return {"fifo_curves": [{"params": dict(k), "val_loss": [loss for loss, _ in c], "epoch_time_s": [t for _, t in c]}
                            for k, c in curves.items()],
            "listed": replay(listed), "this_run_order": replay(space.grid_points(seed=seed)),
            "shuffled_epochs_p10_p50_p90": [deciles[0], deciles[4], deciles[8]],
            "shuffled_best_within_1pct": sum(b <= 1.01 for _, b in shuffled) / len(shuffled)}


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
        runs = {s: run(s, root, synth, model_dir, args.space, args.reduction_factor) for s in ("asha", "fifo")}
        figures = {s: f for s, (f, _) in runs.items()}
        asha, fifo = figures["asha"], figures["fifo"]
        # concurrency as in the real runs: one CPU per trial on a local Ray instance with every core
        replayed = replays(runs["fifo"][1], args.space, asha["seed"], os.cpu_count() or 1, args.reduction_factor)
    ratios = {"trial_epochs": asha["trial_epochs"] / fifo["trial_epochs"], "wall_time": asha["wall_s"] / fifo["wall_s"],
              "best_val_loss": asha["best_val_loss"] / fifo["best_val_loss"]}
    print(f"\n{'':<10}{'trials':>8}{'trial-epochs':>14}{'wall s':>9}{'best val':>10}{'start-up s':>12}")
    for name, f in figures.items():
        print(f"{name:<10}{f['trials']:>8}{f['trial_epochs']:>14}{f['wall_s']:>9.1f}{f['best_val_loss']:>10.4f}"
              f"{f['startup_s_median']:>12.2f}")
    print(f"ASHA (grace 1, reduction factor {args.reduction_factor:g}, max_t 10) / FIFO: trial-epochs {ratios['trial_epochs']:.2f} (goal <= 0.30), wall time {ratios['wall_time']:.2f}, "
          f"best val loss {ratios['best_val_loss']:.4f} (goal within 1 %: <= 1.01)")
    p10, p50, p90 = replayed["shuffled_epochs_p10_p50_p90"]
    print("Ray's ASHAScheduler replayed over FIFO's recorded curves (trial-epochs / FIFO's, best / FIFO's best):\n"
          f"  Ray's listed grid order    {replayed['listed'][0]:.2f}, {replayed['listed'][1]:.4f}\n"
          f"  this ASHA run's order      {replayed['this_run_order'][0]:.2f}, {replayed['this_run_order'][1]:.4f}"
          f"  (the real run: {ratios['trial_epochs']:.2f})\n"
          f"  200 seeded shuffles        p10 {p10:.2f}, median {p50:.2f}, p90 {p90:.2f}; best within 1 % in "
          f"{replayed['shuffled_best_within_1pct']:.0%}")
    if args.json:
        args.json.write_text(json.dumps({"asha_vs_fifo": figures, "asha_fifo_ratios": ratios,
                                         "asha_replayed": replayed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
