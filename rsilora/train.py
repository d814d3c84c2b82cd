"""The training loop: AdamW, warm-up + schedule, accumulation, clipping, early stopping, checkpoints.

Plain PyTorch; no Ray import. The Ray Tune trainable (``rsilora.tune``) drives the same loop
through two hooks: ``on_epoch(metrics, checkpoint_dir)`` after every epoch, and ``resume_from``
(a checkpoint folder: trainable weights + optimizer + scheduler + epoch).

Losses are token-weighted means (sum of token losses / number of caption tokens), so val loss
does not depend on the batch size and ``grad_accum=2, batch=2`` gives exactly the gradient of
``batch=4``.

Run folder layout::

    config.yaml         resolved config
    metrics.json        per-epoch history, best epoch, parameter counts (rewritten every epoch)
    tensorboard/        scalars: loss/train, loss/val, lr, time, memory (+ per-step loss and lr)
    best/               best epoch's weights via save_pretrained (LoRA: adapter_model.safetensors)
    checkpoint/         last epoch: weights/ + trainer_state.pt, for resuming
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import get_scheduler

from rsilora.files import atomic_write_json, replace_dir

SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
STATE_FILE = "trainer_state.pt"

EpochCallback = Callable[[dict[str, Any], Path], None]


@dataclass
class TrainState:
    """Where training stands after the last completed epoch (saved in every checkpoint)."""

    epoch: int = 0
    """Completed epochs."""
    global_step: int = 0
    """Optimizer steps taken."""
    best_val_loss: float = math.inf
    """Lowest val loss so far."""
    best_epoch: int = 0
    """Epoch of the lowest val loss (0: none yet)."""
    epochs_without_improvement: int = 0
    """Epochs since val loss last improved by more than min_delta."""
    stopped_early: bool = False
    """Whether early stopping ended the run."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per-epoch metrics."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warm-up, then ``cosine``, ``linear`` decay to 0, or ``constant`` (transformers' schedules)."""
    return get_scheduler(SCHEDULER_NAMES[name], optimizer, num_warmup_steps=min(warmup_steps, total_steps),
                         num_training_steps=total_steps)


def optimizer_steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (the last, partial accumulation group still steps)."""
    return math.ceil(batches_per_epoch / grad_accum)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None):
    """(sum of caption-token losses, number of caption tokens) for one batch already on device."""
    device_type = batch["labels"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(**batch).loss  # mean over tokens whose label is not -100
    tokens = (batch["labels"] != -100).sum()
    return loss.float() * tokens, tokens


@torch.no_grad()
def evaluate_loss(model, loader, device: torch.device, autocast_dtype: torch.dtype | None = None) -> float:
    """Token-weighted mean caption loss over ``loader`` (independent of batch size)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    for batch in loader:
        loss_sum, n = token_loss_sum(model, _to_device(batch, device), autocast_dtype)
        total += loss_sum
        tokens += n
    model.train(was_training)
    return (total / tokens.clamp(min=1)).item()


def _groups(loader, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield lists of ``size`` consecutive batches (the last may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(model, loader, optimizer, scheduler, device, *, grad_accum: int = 1,
                    max_grad_norm: float | None = 1.0, autocast_dtype=None, on_step=None,
                    progress: tqdm | None = None) -> float:
    """One pass over ``loader``; returns the token-weighted mean train loss.

    Each micro-batch's summed token loss is divided by the token count of its whole accumulation
    group, so the accumulated gradient is the gradient of the group's mean loss.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    for group in _groups(loader, grad_accum):
        group = [_to_device(b, device) for b in group]
        group_tokens = sum((b["labels"] != -100).sum() for b in group).clamp(min=1)
        for batch in group:
            loss_sum, n = token_loss_sum(model, batch, autocast_dtype)
            (loss_sum / group_tokens).backward()
            total += loss_sum.detach()
            tokens += n
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(scheduler.get_last_lr()[0])
        if progress is not None:
            progress.update(len(group))
    return (total / tokens.clamp(min=1)).item()


# --------------------------------------------------------------------------------------------
# Checkpoints: trainable weights (save_pretrained) + optimizer + scheduler + state.


def save_weights(model, folder: Path) -> None:
    """``save_pretrained`` as safetensors: the adapter for a PeftModel, the full model otherwise."""
    model.save_pretrained(folder, safe_serialization=True)


def load_trainable_weights(model, folder: Path) -> None:
    """Load weights written by :func:`save_weights` back into ``model`` (adapter or full)."""
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise RuntimeError(f"{folder}: adapter weights do not fit the model: {result.unexpected_keys[:5]}")
    else:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{folder}: weights do not fit the model: {result.unexpected_keys[:5]}")


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    """Write a resumable checkpoint atomically (staging folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_weights(model, staging / "weights")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "state": asdict(state)}, staging / STATE_FILE)
        atomic_write_json(staging / "state.json", asdict(state))  # human-readable copy
        return replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer and scheduler from :func:`save_checkpoint`; returns the state."""
    folder = Path(folder)
    load_trainable_weights(model, folder / "weights")
    saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState(**saved["state"])


# --------------------------------------------------------------------------------------------
# The loop.


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, in GiB (0.0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def fit(model, train_loader, val_loader, optimizer, scheduler, *, epochs: int, output_dir: Path,
        device: torch.device, seed: int = 0, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
        patience: int | None = None, min_delta: float = 0.0, autocast_dtype: torch.dtype | None = None,
        state: TrainState | None = None, on_epoch: EpochCallback | None = None,
        writer: SummaryWriter | None = None, progress: bool = True,
        metrics_extra: dict[str, Any] | None = None) -> TrainState:
    """Train for up to ``epochs`` epochs (continuing after ``state.epoch`` when resuming).

    After each epoch: validation, TensorBoard scalars, ``checkpoint/`` (resumable), ``best/``
    when val loss reached a new minimum, ``metrics.json``, then ``on_epoch(metrics, checkpoint)``.
    Stops early after ``patience`` epochs without an improvement larger than ``min_delta``.
    Each epoch reseeds from ``(seed, epoch)``, so a resumed run repeats an uninterrupted one.
    """
    state = state or TrainState()
    output_dir = Path(output_dir)
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.stopped_early:
            break
        seed_everything(seed * 10_007 + epoch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)

        def log_step(lr: float) -> None:
            state.global_step += 1
            if writer is not None:
                writer.add_scalar("lr_step", lr, state.global_step)

        start = time.perf_counter()
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, device, grad_accum=grad_accum,
                                     max_grad_norm=max_grad_norm, autocast_dtype=autocast_dtype,
                                     on_step=log_step, progress=bar)
        bar.close()
        val_loss = evaluate_loss(model, val_loader, device, autocast_dtype)
        epoch_time = time.perf_counter() - start

        improved = val_loss < state.best_val_loss
        if val_loss < state.best_val_loss - min_delta:
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        if improved:
            state.best_val_loss, state.best_epoch = val_loss, epoch
        if patience is not None and state.epochs_without_improvement >= patience and epoch < epochs:
            state.stopped_early = True
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "lr": scheduler.get_last_lr()[0], "epoch_time_s": epoch_time,
                   "peak_mem_gb": peak_memory_gb(device), "step": state.global_step,
                   "best_val_loss": state.best_val_loss, "best_epoch": state.best_epoch,
                   "stopped_early": state.stopped_early}
        state.history.append(metrics)
        state.epoch = epoch

        if writer is not None:
            _log_epoch(writer, metrics)
        checkpoint = save_checkpoint(output_dir / "checkpoint", model, optimizer, scheduler, state)
        if improved:
            _save_best(model, output_dir / "best", metrics)
        write_metrics(output_dir / "metrics.json", state, metrics_extra)
        print(f"epoch {epoch}/{epochs}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
              f"lr {metrics['lr']:.2e}  {epoch_time:.1f}s" + ("  *best*" if improved else ""), flush=True)
        if on_epoch is not None:
            on_epoch(metrics, checkpoint)
    if state.stopped_early:
        print(f"early stopping: no val-loss improvement > {min_delta} for {patience} epochs", flush=True)
    return state


def _log_epoch(writer: SummaryWriter, metrics: dict[str, Any]) -> None:
    epoch = metrics["epoch"]
    writer.add_scalar("loss/train", metrics["train_loss"], epoch)
    writer.add_scalar("loss/val", metrics["val_loss"], epoch)
    writer.add_scalar("lr", metrics["lr"], epoch)
    writer.add_scalar("time/epoch_s", metrics["epoch_time_s"], epoch)
    writer.add_scalar("memory/peak_gb", metrics["peak_mem_gb"], epoch)
    writer.flush()


def _save_best(model, folder: Path, metrics: dict[str, Any]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    save_weights(model, staging)
    atomic_write_json(staging / "best.json", metrics)
    replace_dir(staging, folder)


def write_metrics(path: Path, state: TrainState, extra: dict[str, Any] | None = None) -> None:
    """The run's metrics JSON: per-epoch history, best epoch and anything in ``extra``."""
    atomic_write_json(path, {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss if state.best_epoch else None,
        "stopped_early": state.stopped_early,
        "history": state.history,
        **(extra or {}),
    })
