"""The training loop on the tiny model: monitoring outputs, early stopping, accumulation, resume."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from transformers import InstructBlipForConditionalGeneration

from rsilora.augment import eval_transform
from rsilora.config import config_from_dict
from rsilora.data import CaptionCollator, CaptionDataset, load_rsicap
from rsilora.files import OutputExistsError
from rsilora.model import load_model, prepare_model
from rsilora.run import run_training
from rsilora.train import build_scheduler, train_one_epoch

import yaml


def _scalars(folder, tag):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_two_epochs_write_monitoring_outputs_and_val_loss_falls(make_config):
    config = make_config("train.epochs=2", "train.lr=3e-3")
    seen = []
    state = run_training(config, on_epoch=lambda metrics, ckpt: seen.append((metrics, ckpt.is_dir())))
    run = config.train.output_dir
    metrics = json.loads(open(f"{run}/metrics.json").read())
    val = [h["val_loss"] for h in metrics["history"]]
    assert len(val) == 2 and val[1] < val[0]
    assert metrics["best_epoch"] == 2 and metrics["best_val_loss"] == pytest.approx(val[1])
    assert {"train_loss", "val_loss", "lr", "epoch_time_s", "peak_mem_gb"} <= set(metrics["history"][0])
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["lora"] > 0
    assert metrics["data"]["train_images"] + metrics["data"]["val_images"] == 40
    assert [m["epoch"] for m, is_dir in seen] == [1, 2] and all(is_dir for _, is_dir in seen)
    assert [v for _, v in _scalars(f"{run}/tensorboard", "loss/val")] == pytest.approx(val)
    assert len(_scalars(f"{run}/tensorboard", "lr_step")) == state.global_step
    saved = config_from_dict(yaml.safe_load(open(f"{run}/config.yaml")))
    assert saved == config
    # the best adapter loads with plain PEFT
    base = InstructBlipForConditionalGeneration.from_pretrained(config.model.name_or_path)
    assert isinstance(PeftModel.from_pretrained(base, f"{run}/best"), PeftModel)
    assert json.loads(open(f"{run}/best/best.json").read())["epoch"] == 2


def test_early_stopping_fires(make_config):
    config = make_config("train.epochs=6", "train.lr=1e-9", "train.early_stopping_patience=2",
                         "train.early_stopping_min_delta=0.01")
    state = run_training(config)
    # epoch 1 sets the best from infinity; epochs 2 and 3 do not improve by 0.01 -> stop after 3
    assert state.stopped_early and state.epoch == 3
    metrics = json.loads(open(f"{config.train.output_dir}/metrics.json").read())
    assert metrics["stopped_early"] and metrics["epochs_run"] == 3


def test_existing_run_folder_is_not_overwritten(make_config):
    config = make_config("train.epochs=1")
    run_training(config)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_training(config)
    run_training(config, overwrite=True)


def test_zero_shot_mode_has_nothing_to_train(make_config):
    with pytest.raises(ValueError, match="nothing to train"):
        run_training(make_config("model.mode=zero-shot"))


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(make_config, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_after_two(metrics, checkpoint):
        if metrics["epoch"] == 2:
            raise Interrupt

    config = make_config("train.epochs=3", "train.early_stopping_patience=null")
    with pytest.raises(Interrupt):
        run_training(config, tmp_path / "interrupted", on_epoch=stop_after_two)
    resumed = run_training(config, tmp_path / "interrupted", resume_from=tmp_path / "interrupted" / "checkpoint")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    full = run_training(config, tmp_path / "full")
    for a, b in zip(resumed.history, full.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert resumed.global_step == full.global_step


def _no_dropout(model):
    """Dropout masks depend on batch shape; switch off both module and functional dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout"):  # T5 / Q-Former attention use F.dropout(p=float)
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def test_grad_accumulation_2x2_equals_batch_4(tiny_model_dir, synth, tiny_processor):
    records = load_rsicap(synth.rsicap_dir).records[:4]
    dataset = CaptionDataset(records, eval_transform(224))
    collate = CaptionCollator(tiny_processor)
    deltas = []
    for batch_size, accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = _no_dropout(prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "lora", r=4,
                                          alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # so that lora_A gets a gradient too
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = build_scheduler(optimizer, "constant", 0, 1)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), grad_accum=accum,
                        max_grad_norm=None)
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad})
    # captions differ in length: a mean of per-batch means would not match; token weighting does
    for name in deltas[0]:
        torch.testing.assert_close(deltas[0][name], deltas[1][name], rtol=1e-4, atol=1e-6)
    assert sum(d.abs().sum() for d in deltas[0].values()) > 0


@pytest.mark.parametrize("name,middle,end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_schedules_warm_up_then_follow_their_shape(name, middle, end):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, name, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(middle, abs=0.02)
    assert scheduler.get_last_lr()[0] == pytest.approx(end, abs=1e-6)
