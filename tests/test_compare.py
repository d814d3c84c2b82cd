"""Caption generation and the comparison table on the tiny models (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from rsilora import compare
from rsilora.data import load_rsieval
from rsilora.predict import FINE_TUNED_PROMPT, ZERO_SHOT_PROMPT, generate_captions, load_captioner
from rsilora.run import run_training
from rsilora.tiny import write_tiny_model

CPU = torch.device("cpu")
FAST = compare.Generation(batch_size=4, max_new_tokens=24, num_beams=1, repetition_penalty=1.0, resamples=100)


@pytest.fixture(scope="module")
def tiny_blip2_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-blip2", kind="blip2")


@pytest.fixture(scope="module")
def lora_run(synth, tiny_model_dir, tmp_path_factory):
    """A short LoRA run whose best/ adapter the comparison evaluates."""
    from rsilora.config import load_config

    out = tmp_path_factory.mktemp("lora-run")
    config = load_config(overrides=[f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
                                    f"data.split_dir={out}/splits", f"model.name_or_path={tiny_model_dir}",
                                    f"train.output_dir={out}/run", "train.progress=false", "train.epochs=3",
                                    "train.lr=1e-2", "train.batch_size=4"], preset="tiny", base_dir=out)
    run_training(config)
    return out / "run"


def test_batched_generation_equals_one_image_at_a_time(synth, tiny_model_dir):
    records = load_rsieval(synth.rsieval_dir).records[:5]
    captioner = load_captioner("zero-shot", str(tiny_model_dir), CPU)
    batched, speed = generate_captions(captioner, records, ZERO_SHOT_PROMPT, CPU, batch_size=5, max_new_tokens=12,
                                       num_beams=1, repetition_penalty=1.0)
    single, _ = generate_captions(captioner, records, ZERO_SHOT_PROMPT, CPU, batch_size=1, max_new_tokens=12,
                                  num_beams=1, repetition_penalty=1.0)
    assert batched == single and len(batched) == 5
    assert speed["inference_s_per_image"] > 0 and speed["peak_mem_gb"] == 0.0


def test_tiny_blip2_captions(synth, tiny_blip2_dir):
    records = load_rsieval(synth.rsieval_dir).records[:2]
    captioner = load_captioner("blip2-zero-shot", str(tiny_blip2_dir), CPU)
    captions, _ = generate_captions(captioner, records, ZERO_SHOT_PROMPT, CPU, max_new_tokens=8, num_beams=1)
    assert len(captions) == 2 and captioner.trainable_params == 0


def test_evaluate_one_model_writes_predictions_and_metrics(synth, tiny_model_dir, tmp_path):
    entry = compare.evaluate_candidate(compare.zero_shot(str(tiny_model_dir)), str(synth.rsieval_dir), tmp_path,
                                       FAST, CPU)
    folder = tmp_path / "instructblip-zero-shot"
    rows = json.loads((folder / "predictions.json").read_text())
    assert len(rows) == synth.test_images and set(rows[0]) == {"filename", "prediction", "reference", "prompt"}
    assert (folder / "predictions.csv").read_text().startswith("filename,prediction,reference,prompt")
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["prompt"] == ZERO_SHOT_PROMPT  # the plan's zero-shot prompt by default
    assert set(saved["scores"]) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert all(lo <= saved["scores"][m] <= hi for m, (lo, hi) in saved["ci"].items())
    assert entry["parameters"]["trainable"] == 0 and entry["inference_s_per_image"] > 0


def test_comparison_table_with_lora_and_full_fine_tuning(synth, tiny_model_dir, tiny_blip2_dir, lora_run, tmp_path):
    from rsilora.config import load_config

    full_config = load_config(overrides=[f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
                                         f"data.split_dir={tmp_path}/splits", f"model.name_or_path={tiny_model_dir}",
                                         f"train.output_dir={tmp_path}/full", "train.progress=false", "train.epochs=1",
                                         "model.mode=full", "train.lr=1e-4"], preset="tiny", base_dir=tmp_path)
    run_training(full_config)
    candidates = [compare.blip2(str(tiny_blip2_dir)), compare.zero_shot(str(tiny_model_dir)),
                  compare.from_run(str(lora_run / "best"), str(tiny_model_dir), "lora"),
                  compare.from_run(str(tmp_path / "full" / "best"), str(tiny_model_dir), "full")]
    result = compare.compare(candidates, str(synth.rsieval_dir), tmp_path / "eval", FAST, CPU)
    assert [m["kind"] for m in result["models"]] == ["blip2-zero-shot", "zero-shot", "lora", "full"]
    lora, full = result["models"][2], result["models"][3]
    assert lora["prompt"] == FINE_TUNED_PROMPT and lora["training"] == "RSICap"
    assert 0 < lora["parameters"]["trainable"] < full["parameters"]["trainable"] == full["parameters"]["total"]
    assert lora["training_time_s"] > 0 and full["training_time_s"] > 0
    eff = result["efficiency"]
    assert 0 < eff["trainable_ratio"] < 1 and eff["training_time_ratio"] > 0
    assert {p["a"] for p in result["paired"]} == {"instructblip-lora", "instructblip-full"}
    table = (tmp_path / "eval" / "comparison.md").read_text()
    for column in ("Model", "Training", "Parameters", "BLEU-4 (95% CI)", "CIDEr (95% CI)", "ROUGE-L", "METEOR",
                   "Inference time", "GPU memory"):
        assert f"| {column} |" in table or f" {column} |" in table
    assert "LoRA vs full fine-tuning" in table
    csv_header = (tmp_path / "eval" / "comparison.csv").read_text().splitlines()[0]
    assert csv_header.startswith("Model,Training,Parameters")
    with pytest.raises(FileExistsError):
        compare.compare(candidates[:1], str(synth.rsieval_dir), tmp_path / "eval", FAST, CPU)


def test_repeats_report_mean_and_std_over_seeds(make_config, synth, tmp_path):
    from rsilora.repeats import repeat

    config = make_config("train.epochs=1", "train.lr=1e-2")
    result = repeat(config, [1, 2], str(synth.rsieval_dir), tmp_path / "repeats", FAST, CPU)
    assert [r["seed"] for r in result["runs"]] == [1, 2]
    bleu4 = [r["scores"]["BLEU-4"] for r in result["runs"]]
    assert result["summary"]["BLEU-4"]["mean"] == pytest.approx(sum(bleu4) / 2)
    assert result["summary"]["BLEU-4"]["std"] == pytest.approx(abs(bleu4[0] - bleu4[1]) / 2 ** 0.5)
    assert result["runs"][0]["best_val_loss"] != result["runs"][1]["best_val_loss"]  # the seed matters
    text = (tmp_path / "repeats" / "repeats.md").read_text()
    assert "| BLEU-4 |" in text and "stability bar" in text
    with pytest.raises(ValueError, match="two distinct seeds"):
        repeat(config, [1], str(synth.rsieval_dir), tmp_path / "again", FAST, CPU)


def test_compare_and_report_commands(synth, tiny_model_dir, lora_run, tmp_path):
    """The user's path: `rsilora compare` then `rsilora report --eval` on its folder."""
    import subprocess
    import sys
    from pathlib import Path

    rsilora = str(Path(sys.executable).parent / "rsilora")
    compared = subprocess.run([rsilora, "compare", "--preset", "tiny", "--data", str(synth.rsieval_dir),
                               "--model", str(tiny_model_dir), "--adapter", str(lora_run / "best"),
                               "--out", str(tmp_path / "eval"), "--resamples", "50", "eval.max_new_tokens=16"],
                              capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "| InstructBLIP + LoRA | RSICap |" in compared.stdout
    reported = subprocess.run([rsilora, "report", "--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "rep")],
                              capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr[-2000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "InstructBLIP + LoRA" in text and (tmp_path / "rep" / "baseline_comparison.png").is_file()
    missing = subprocess.run([rsilora, "evaluate", "--data", str(synth.rsieval_dir), "--model", "./no-such-model",
                              "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
