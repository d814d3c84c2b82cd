"""The report and its figures (rsilora.report, rsilora.plots) from a real (tiny) stage-1 experiment and an evaluation folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsilora import plots, report, results
from rsilora.files import OutputExistsError
from rsilora.results import TrialSummary

from conftest import write_comparison

@pytest.fixture
def quick_eval(synth, tmp_path) -> Path:
    """An evaluation folder whose LoRA model is not a trial of any experiment (no Ray needed)."""
    return write_comparison(tmp_path / "eval", synth.rsieval_dir, None)


def assert_png(path: Path, figsize: tuple[float, float]) -> None:
    """A valid PNG of exactly figsize x 300 dpi that is not blank."""
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == (round(figsize[0] * plots.DPI), round(figsize[1] * plots.DPI))
        assert np.asarray(img.convert("L"), dtype=float).std() > 0


# --------------------------------------------------------------------------------------------
# Without an experiment (fast)


def test_comparison_figures_are_full_size_pngs(quick_eval, tmp_path):
    comparison = report.load_comparison(quick_eval)
    assert_png(plots.plot_baseline_comparison(comparison, tmp_path / "b.png"), plots.BASELINE_FIGSIZE)
    assert_png(plots.plot_efficiency_tradeoff(comparison, tmp_path / "e.png"), plots.EFFICIENCY_FIGSIZE)
    assert_png(plots.plot_samples(comparison, quick_eval, tmp_path / "s.png", n=3),
               plots.samples_figsize(3, len(comparison["models"])))


def test_samples_draw_captions_even_without_the_images(quick_eval, tmp_path):
    comparison = {**report.load_comparison(quick_eval), "data": str(tmp_path / "elsewhere")}
    assert_png(plots.plot_samples(comparison, quick_eval, tmp_path / "s.png", n=2), plots.samples_figsize(2, 4))


def test_loss_curves_are_capped_at_24_best_panels(tmp_path):
    trials = [_fake_trial(i) for i in range(30)]
    path = plots.plot_loss_curves(trials, tmp_path / "loss.png")
    assert_png(path, plots.loss_curves_figsize(24))
    assert plots.loss_curves_figsize(5) == (14.0, 7.25)  # 3 columns, 2 rows


def _fake_trial(i: int) -> TrialSummary:
    history = [{"epoch": e, "train_loss": 3 - 0.1 * e - 0.01 * i, "val_loss": 3.2 - 0.05 * e + 0.01 * i}
               for e in range(1, 4 if i % 2 else 2)]
    return TrialSummary(trial_id=f"t_{i:05d}", trial_dir="/x", overrides={"lora.r": 2 ** (i % 5), "train.lr": 1e-4},
                        config={}, best_val_loss=min(h["val_loss"] for h in history),
                        best_epoch=len(history), best_checkpoint=None, train_loss_at_best=history[-1]["train_loss"],
                        epochs_run=len(history), planned_epochs=3,
                        status="completed" if i % 2 else "stopped by ASHA", time_s=10.0, trainable_params=24576,
                        history=history)


def test_formatters_and_markdown_table():
    assert plots.fmt_params(18874368) == "18.87 M" and plots.fmt_params(4022969088) == "4.02 B"
    assert plots.fmt_time(9720) == "2 h 42 min" and plots.fmt_time(785) == "13 min 5 s"
    assert plots.trial_label({"lora.dropout": 0.1, "lora.alpha": 32, "lora.r": 16}) == "r=16, α=32, dropout=0.1"
    assert plots.trial_label({"train.lr": 3e-5}) == "lr=3e-05"
    table = report.markdown_table([{"A": 1, "B": "x|y"}, {"A": None, "B": "z"}])
    assert table.splitlines() == ["| A | B |", "| --- | --- |", "| 1 | x\\|y |", "| — | z |"]


def test_load_comparison_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "comparison.json").write_text(json.dumps({"data": "/x", "images": 3}))
    with pytest.raises(ValueError, match=r"comparison\.json.*\"models\" is missing"):
        report.load_comparison(tmp_path)
    (tmp_path / "comparison.json").write_text(json.dumps({"models": [{"key": "m", "label": "M", "scores": {}}]}))
    with pytest.raises(ValueError, match=r'm: scores\["BLEU-4"\] missing'):
        report.load_comparison(tmp_path)
    (tmp_path / "comparison.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_comparison(tmp_path)
    with pytest.raises(FileNotFoundError, match="comparison.json"):
        report.load_comparison(tmp_path / "nowhere")


def test_report_of_an_evaluation_only(quick_eval, tmp_path):
    path = report.write_report(None, quick_eval, tmp_path / "out")
    text = path.read_text()
    assert "Model | Training | Parameters" in text and "## Search" not in text
    assert "Trainable parameters, LoRA / full fine-tuning: 0.0047 (plan's goal ≤ 0.01)" in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["baseline_comparison.png", "efficiency_tradeoff.png",
                                                            "report.md", "samples.png"]


def test_report_refuses_to_write_over_its_inputs(quick_eval, tmp_path):
    with pytest.raises(ValueError, match="would delete it"):
        report.write_report(None, quick_eval, tmp_path, overwrite=True)
    assert (quick_eval / "comparison.json").is_file()
    with pytest.raises(ValueError, match="experiment folder, an evaluation folder"):
        report.write_report(None, None, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# With a real stage-1 experiment (about 45 s to build, once per session)


@pytest.mark.slow
def test_full_report(tiny_experiment, tiny_eval_dir, tmp_path):
    trials = results.read_trials(tiny_experiment)
    path = report.write_report(tiny_experiment, tiny_eval_dir, tmp_path / "results")
    out = path.parent
    text = path.read_text()
    figures = {"loss_curves.png": plots.loss_curves_figsize(len(trials)),
               "baseline_comparison.png": plots.BASELINE_FIGSIZE,
               "efficiency_tradeoff.png": plots.EFFICIENCY_FIGSIZE, "samples.png": plots.samples_figsize(4, 4)}
    for name, figsize in figures.items():
        assert_png(out / name, figsize)
        assert f"]({name})" in text
    assert "](config_table.md)" in text and "](config_table.csv)" in text
    assert "Model | Training | Parameters" in text and "```yaml" in text
    assert "stage: stage1, space: plan" in text and "scheduler: asha" in text
    meta = json.loads(next((tiny_experiment.parent / "splits").glob("*/split.json")).read_text())
    assert f"{meta['train_images']} train / {meta['val_images']} val images" in text
    assert "| torch |" in text and "git commit: `" in text

    rows = list(csv.DictReader((out / "config_table.csv").open()))
    assert [r["Configuration"] for r in rows[:len(trials)]] == [r["Configuration"] for r in
                                                              report.config_table(trials, None)]
    assert len(rows) == len(trials) + 3  # + zero-shot, BLIP-2, full FT (the LoRA model is a trial)
    best = results.best(tiny_experiment)
    assert rows[0]["RSIEval BLEU-4"] == "0.210" and rows[0]["Val loss"] == f"{best.val_loss:.4f}"
    assert all(r["RSIEval BLEU-4"] == "—" for r in rows[1:len(trials)])
    assert any("stopped by ASHA" in r["Configuration"] for r in rows)
    assert (out / "config_table.md").read_text().startswith("| Configuration | Train loss | Val loss |")


@pytest.mark.slow
def test_report_of_an_experiment_only_and_no_silent_overwrite(tiny_experiment, tmp_path):
    out = tmp_path / "results"
    path = report.write_report(tiny_experiment, None, out)
    text = path.read_text()
    assert "Model | Training | Parameters" not in text and "RSIEval BLEU-4 | Parameters" in text
    assert not (out / "samples.png").exists() and (out / "loss_curves.png").is_file()
    with pytest.raises(OutputExistsError):
        report.write_report(tiny_experiment, None, out)
    (out / "note.txt").write_text("mine")
    report.write_report(tiny_experiment, None, out, overwrite=True)
    assert not (out / "note.txt").exists() and (out / "report.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
