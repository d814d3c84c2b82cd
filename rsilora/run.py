"""The top of a training run: turn a :class:`~rsilora.config.Config` into data, model and loop.

This is the only place (with the CLI and the Tune driver) that reads the config; everything it
calls takes plain arguments. Used by ``rsilora train`` and by the Ray Tune trainable.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from rsilora import data as rsdata
from rsilora import features
from rsilora.augment import build_transform
from rsilora.config import Config, save_config
from rsilora.files import prepare_output_dir
from rsilora.model import (
    compute_dtype,
    count_parameters,
    image_size,
    load_model,
    load_processor,
    prepare_model,
    resolve_device,
)
from rsilora.train import (
    EpochCallback,
    TrainState,
    build_optimizer,
    build_scheduler,
    fit,
    load_checkpoint,
    optimizer_steps_per_epoch,
    seed_everything,
)


@dataclass
class PreparedData:
    """RSICap split into train/val records, with what was checked on the way."""

    train: list[rsdata.CaptionRecord]
    val: list[rsdata.CaptionRecord]
    split: rsdata.Split
    split_dir: Path
    skipped: list[rsdata.DataProblem]
    test_images: int | None

    def summary(self) -> dict[str, Any]:
        return {"split": self.split.by, "split_seed": self.split.seed, "split_dir": str(self.split_dir),
                "train_images": len(self.train), "val_images": len(self.val),
                "skipped_records": len(self.skipped), "test_images": self.test_images}


def prepare_data(config: Config, verify_images: bool = True) -> PreparedData:
    """Load RSICap, split it (reusing the saved split), and refuse RSIEval leakage."""
    cfg = config.data
    rsicap = rsdata.load_rsicap(cfg.rsicap_dir, skip_bad=cfg.skip_bad, verify_images=verify_images)
    skipped = list(rsicap.skipped)
    split_root = Path(cfg.split_dir) if cfg.split_dir else Path(cfg.rsicap_dir) / "splits"
    split, split_dir, _ = rsdata.load_or_create_split(rsicap.filenames, split_root, cfg.val_fraction,
                                                      cfg.split_seed, cfg.split_by)
    test_images = None
    if cfg.rsieval_dir:
        rsieval = rsdata.load_rsieval(cfg.rsieval_dir, skip_bad=cfg.skip_bad, verify_images=verify_images)
        skipped += rsieval.skipped
        leaks = rsdata.leakage_problems(split, rsieval.filenames, cfg.rsieval_dir)
        if leaks:
            raise rsdata.DataError(leaks)
        test_images = len(rsieval.records)
    for problem in skipped:
        warnings.warn(f"skipped bad record: {problem}", stacklevel=2)
    return PreparedData(rsdata.select(rsicap.records, split.train), rsdata.select(rsicap.records, split.val),
                        split, split_dir, skipped, test_images)


def feature_cache(config: Config, model, processor) -> features.FeatureCache:
    """The cache folder for this model's vision tower and the data settings."""
    cfg = config.data
    root = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else Path(cfg.rsicap_dir) / "features"
    return features.cache_for(root, features.base_model(model).vision_model, config.model.name_or_path, processor.image_processor,
                              image_size(processor), cfg.cache_views, cfg.augment, cfg.aug_prob, cfg.split_seed)


def cache_features(config: Config, prepared: PreparedData, model, processor, device: torch.device,
                   progress: bool = True) -> features.FeatureCache:
    """Fill the cache for the train and val images (what is there already is reused)."""
    cache = feature_cache(config, model, processor)
    computed = _fill_cache(cache, prepared, model, processor, device, progress)
    print(f"feature cache: {cache.folder} ({computed} views computed now)", flush=True)
    return cache


def _fill_cache(cache: features.FeatureCache, prepared: PreparedData, model, processor, device: torch.device,
                progress: bool) -> int:
    """Compute the missing train views and val views; returns how many were computed."""
    tower = features.base_model(model).vision_model
    return sum(features.build_cache(cache, records, tower, processor.image_processor, device, train=train,
                                    progress=progress)
               for records, train in ((prepared.train, True), (prepared.val, False)))


def build_feature_cache(config: Config) -> int:
    """Fill the feature cache for ``config``'s data and model once, before trials share it.

    Returns the number of views computed (0 when everything was cached already).
    """
    device = resolve_device(config.train.device)
    prepared = prepare_data(config, verify_images=False)
    processor = load_processor(config.model.name_or_path)
    model = load_model(config.model.name_or_path, device)
    computed = _fill_cache(feature_cache(config, model, processor), prepared, model, processor, device,
                           config.train.progress)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return computed


def make_loaders(prepared: PreparedData, processor, config: Config, device: torch.device,
                 cache: features.FeatureCache | None = None):
    """Train loader (augmented, shuffled) and val loader (resize only, in order).

    With a feature cache the datasets yield cached tower outputs instead of images.
    """
    cfg, size = config.data, image_size(processor)
    collator = features.CachedFeatureCollator if cache else rsdata.CaptionCollator
    collate = collator(processor, cfg.max_prompt_tokens, cfg.max_caption_tokens)
    common = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0)
    if cache:
        train_set = features.CachedFeatureDataset(prepared.train, cache, True, cfg.prompt)
        val_set = features.CachedFeatureDataset(prepared.val, cache, False, cfg.prompt)
    else:
        train_set = rsdata.CaptionDataset(prepared.train, build_transform(True, size, cfg.augment, cfg.aug_prob),
                                          cfg.prompt)
        val_set = rsdata.CaptionDataset(prepared.val, build_transform(False, size), cfg.prompt)
    train = DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True, **common)
    val = DataLoader(val_set, batch_size=config.train.eval_batch_size or config.train.batch_size, **common)
    return train, val


def run_training(config: Config, output_dir: str | Path | None = None, *, on_epoch: EpochCallback | None = None,
                 resume_from: str | Path | None = None, overwrite: bool = False,
                 verify_images: bool = True) -> TrainState:
    """Train as ``config`` says; write the run folder (see :mod:`rsilora.train`).

    ``resume_from`` continues from a checkpoint folder (e.g. ``<run>/checkpoint``). A non-empty
    output folder is refused unless resuming into it or ``overwrite`` is set. ``verify_images=False``
    skips decoding every image up front (the Tune driver has already checked them once).
    """
    tcfg = config.train
    if config.model.mode == "zero-shot":
        raise ValueError("model.mode=zero-shot has nothing to train; use `rsilora evaluate`")
    output_dir = Path(output_dir or tcfg.output_dir)
    if resume_from is None:
        prepare_output_dir(output_dir, overwrite=overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    seed_everything(tcfg.seed)
    device = resolve_device(tcfg.device)
    prepared = prepare_data(config, verify_images=verify_images)
    print(prepared.split.summary(), flush=True)
    processor = load_processor(config.model.name_or_path)
    lengths = rsdata.caption_lengths([r.caption for r in prepared.train + prepared.val], processor.tokenizer,
                                     config.data.max_caption_tokens)
    print(f"captions (train+val): {lengths.summary()}", flush=True)

    model = load_model(config.model.name_or_path, device)
    lora = config.lora
    model = prepare_model(model, config.model.mode, lora.r, lora.alpha, lora.dropout, lora.target_modules,
                          config.model.gradient_checkpointing)
    params = count_parameters(model)
    print(params.table(), flush=True)

    cache = None
    if config.data.feature_cache and config.model.mode != "lora":
        print(f"feature cache off: model.mode={config.model.mode} trains the vision tower", flush=True)
    elif config.data.feature_cache:
        cache = cache_features(config, prepared, model, processor, device, progress=tcfg.progress)
        features.use_cached_features(model)  # the tower leaves the GPU: dropped, not needed any more
        if device.type == "cuda":
            torch.cuda.empty_cache()
    train_loader, val_loader = make_loaders(prepared, processor, config, device, cache)
    total_steps = optimizer_steps_per_epoch(len(train_loader), tcfg.grad_accum) * tcfg.epochs
    optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg.scheduler, tcfg.warmup_steps, total_steps)
    state = load_checkpoint(Path(resume_from), model, optimizer, scheduler) if resume_from else None
    if state is not None:
        print(f"resuming after epoch {state.epoch} (step {state.global_step})", flush=True)

    if on_epoch is not None:  # each report carries the run's size, for tables across trials
        report, on_epoch = on_epoch, lambda metrics, ckpt: report({**metrics, "trainable_params": params.trainable,
                                                                    "total_params": params.total}, ckpt)
    extra = {"parameters": asdict(params), "data": prepared.summary(), "captions": asdict(lengths),
             "device": str(device), "mode": config.model.mode, "total_steps": total_steps}
    with SummaryWriter(str(output_dir / "tensorboard")) as writer:
        state = fit(model, train_loader, val_loader, optimizer, scheduler, epochs=tcfg.epochs,
                    output_dir=output_dir, device=device, seed=tcfg.seed, grad_accum=tcfg.grad_accum,
                    max_grad_norm=tcfg.max_grad_norm, patience=tcfg.early_stopping_patience,
                    min_delta=tcfg.early_stopping_min_delta,
                    autocast_dtype=compute_dtype(device) if device.type == "cuda" else None,
                    state=state, on_epoch=on_epoch, writer=writer, progress=tcfg.progress, metrics_extra=extra)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return state
