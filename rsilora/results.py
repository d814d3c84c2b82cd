"""Read a finished (or running) Ray Tune experiment: every trial, the best one, export its adapter.

Only JSON is read — each trial's ``params.json`` and ``result.json`` and the stage record
``rsilora-stage.json`` that :mod:`rsilora.tune` writes — never Ray's pickled experiment state, so
retrieving results is safe on any folder. The best trial is judged over each trial's *best* epoch
(lowest val_loss ever reported), not its last, like ``ResultGrid.get_best_result(scope="all")``.
Experiment folders may be local/NFS paths or URIs that pyarrow understands (``s3://...``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rsilora.config import config_from_dict, merge, nest_dotted, to_yaml
from rsilora.files import atomic_write_json, prepare_output_dir, replace_dir

STAGE_FILE = "rsilora-stage.json"


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI such as ``s3://bucket/x``."""
    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def normalise(location: str | Path) -> str:
    """Absolute local path, or the URI unchanged."""
    location = str(location)
    return location if "://" in location else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    return "/".join([location.rstrip("/"), *parts]) if "://" in location else str(Path(location, *parts))


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_json(location: str, obj: Any) -> None:
    """Write JSON to a local path (atomically) or a URI."""
    if "://" not in location:
        atomic_write_json(location, obj)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@dataclass
class TrialSummary:
    """One trial of an experiment, summarised from its reported epochs."""

    trial_id: str
    trial_dir: str
    overrides: dict[str, Any]
    """The trial's searched values (dotted config keys)."""
    config: dict[str, Any]
    """The trial's full resolved config (stage base config + overrides)."""
    best_val_loss: float | None
    best_epoch: int | None
    best_checkpoint: str | None
    """Checkpoint folder of the best epoch (None if not kept or never reported)."""
    train_loss_at_best: float | None
    epochs_run: int
    planned_epochs: int
    status: str
    """completed, early-stopped (patience), stopped by ASHA, errored, or running/incomplete."""
    time_s: float
    """Wall time of the trial (Ray's time_total_s at its last report)."""
    trainable_params: int | None = None
    """Trainable parameters of the trial's model (LoRA adapters), as reported."""
    nodes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BestTrial:
    """The experiment's best trial, judged by its best epoch."""

    experiment: str
    trial_id: str
    val_loss: float
    epoch: int
    checkpoint: str | None
    overrides: dict[str, Any]
    config: dict[str, Any]
    training_time_s: float | None = None
    """Sum of the trial's epoch times (training + validation, no start-up)."""
    training_peak_mem_gb: float | None = None
    """Highest peak GPU memory of the trial's epochs (0.0 on CPU)."""


def read_stage(experiment: str | Path) -> dict[str, Any]:
    """The stage record written by :mod:`rsilora.tune` (stage, base config, space, previous)."""
    location = join(normalise(experiment), STAGE_FILE)
    if not exists(location):
        raise FileNotFoundError(f"{experiment} is not an rsilora experiment ({STAGE_FILE} missing)")
    return json.loads(read_text(location))


def _rows(location: str) -> list[dict[str, Any]]:
    if not exists(location):
        return []
    return [json.loads(line) for line in read_text(location).splitlines() if line.strip()]


def read_trials(experiment: str | Path) -> list[TrialSummary]:
    """Every trial folder of ``experiment`` (those with a ``params.json``), sorted by trial id."""
    experiment = normalise(experiment)
    stage = read_stage(experiment)
    fs, root = filesystem(experiment)
    trials = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory:
            continue
        trial_dir = join(experiment, info.base_name)
        if not exists(join(trial_dir, "params.json")):
            continue
        trials.append(_summarise(trial_dir, stage))
    return sorted(trials, key=lambda t: t.trial_id)


def _summarise(trial_dir: str, stage: dict[str, Any]) -> TrialSummary:
    overrides = json.loads(read_text(join(trial_dir, "params.json")))
    config = merge(stage["base_config"], nest_dotted(overrides))
    rows = [r for r in _rows(join(trial_dir, "result.json")) if "val_loss" in r]
    planned = int(config["train"]["epochs"])
    errored = _failed_last(trial_dir, rows)
    best = min(rows, key=lambda r: r["val_loss"]) if rows else None
    checkpoint = None
    if best is not None and best.get("checkpoint_dir_name"):
        candidate = join(trial_dir, best["checkpoint_dir_name"])
        checkpoint = candidate if exists(candidate) else None
    epochs_run = max((r["epoch"] for r in rows), default=0)
    if errored:
        status = "errored"
    elif rows and rows[-1].get("stopped_early"):
        status = "early-stopped"
    elif epochs_run >= planned:
        status = "completed"
    elif stage.get("scheduler") == "asha" and rows:
        status = "stopped by ASHA"  # or still running, while the experiment runs
    else:
        status = "incomplete"
    trial_id = rows[-1]["trial_id"] if rows else Path(trial_dir).name
    return TrialSummary(
        trial_id=trial_id, trial_dir=trial_dir, overrides=overrides, config=config,
        best_val_loss=best["val_loss"] if best else None, best_epoch=best["epoch"] if best else None,
        best_checkpoint=checkpoint, train_loss_at_best=best["train_loss"] if best else None,
        epochs_run=epochs_run, planned_epochs=planned, status=status,
        time_s=float(rows[-1].get("time_total_s", 0.0)) if rows else 0.0,
        trainable_params=rows[-1].get("trainable_params") if rows else None,
        nodes=sorted({r["node_id"] for r in rows if "node_id" in r}),
        history=[{k: r[k] for k in ("epoch", "train_loss", "val_loss", "lr", "epoch_time_s", "peak_mem_gb")
                  if k in r} for r in rows],
    )


def _failed_last(trial_dir: str, rows: list[dict[str, Any]]) -> bool:
    """Whether the trial's last event is a failure.

    A trial that Ray restarted after a failure keeps its ``error.txt`` ("Failure # N (occurred at
    <date>)") but reports again afterwards; Ray's row dates use the same format.
    """
    location = join(trial_dir, "error.txt")
    if not exists(location):
        return False
    failures = re.findall(r"occurred at (\S+)\)", read_text(location))
    return not rows or not failures or failures[-1] >= rows[-1].get("date", "")



def best(experiment: str | Path, trials: list[TrialSummary] | None = None) -> BestTrial:
    """The trial with the lowest val_loss at any epoch, its config, epoch and checkpoint.

    ``trials``: the experiment's :func:`read_trials`, when the caller has them already.
    """
    trials = [t for t in (read_trials(experiment) if trials is None else trials) if t.best_val_loss is not None]
    if not trials:
        raise ValueError(f"{experiment}: no trial has reported a val_loss yet")
    top = min(trials, key=lambda t: t.best_val_loss)
    return BestTrial(normalise(experiment), top.trial_id, top.best_val_loss, top.best_epoch, top.best_checkpoint,
                     top.overrides, top.config, sum(h.get("epoch_time_s", 0.0) for h in top.history),
                     max((h.get("peak_mem_gb", 0.0) for h in top.history), default=None))


def trials_table(trials: list[TrialSummary]) -> str:
    """A fixed-width table of all trials: searched values, best val loss and epoch, status, time."""
    keys = sorted({k for t in trials for k in t.overrides})
    header = ["trial", *keys, "best val", "at epoch", "epochs", "status", "time s"]
    rows = [[t.trial_id, *[_fmt(t.overrides.get(k)) for k in keys],
             _fmt(t.best_val_loss), str(t.best_epoch or "-"), f"{t.epochs_run}/{t.planned_epochs}", t.status,
             f"{t.time_s:.0f}"] for t in sorted(trials, key=lambda t: (t.best_val_loss is None, t.best_val_loss))]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def best_as_dict(top: BestTrial) -> dict[str, Any]:
    return asdict(top)


def export_best(experiment: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the best trial's best-epoch adapter to ``out`` with its resolved config.

    ``out`` then loads with plain ``PeftModel.from_pretrained(base_model, out)``; ``config.yaml``
    and ``best.json`` record where it came from.
    """
    top = best(experiment)
    if top.checkpoint is None:
        raise FileNotFoundError(f"{experiment}: the best epoch's checkpoint of trial {top.trial_id} was not kept")
    out = Path(out)
    prepare_output_dir(out, overwrite=overwrite)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fs, path = filesystem(top.checkpoint)
        pafs.copy_files(f"{path}/weights", str(staging), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (staging / "config.yaml").write_text(to_yaml(config_from_dict(top.config)), encoding="utf-8")
        atomic_write_json(staging / "best.json", {k: v for k, v in asdict(top).items() if k != "config"})
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
