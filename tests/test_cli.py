"""The ``rsilora`` console script as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import placeholder_images, write_dataset

RSILORA = str(Path(sys.executable).parent / "rsilora")


def rsilora(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([RSILORA, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_synth_tiny_model_and_train_three_epochs(tmp_path):
    assert rsilora("synth", "--out", "data/synthetic", "--train-images", 48, "--test-images", 8,
                   "--image-size", 128, cwd=tmp_path).returncode == 0
    made = rsilora("tiny-model", "--out", "models/tiny-instructblip", cwd=tmp_path)
    assert made.returncode == 0 and "parameters" in made.stdout
    run = rsilora("train", "--preset", "tiny", "train.epochs=3", "train.progress=false", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "runs" / "train" / "tiny"
    metrics = json.loads((folder / "metrics.json").read_text())
    val = [h["val_loss"] for h in metrics["history"]]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert (folder / "best" / "adapter_model.safetensors").is_file()
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert "lora:" in (folder / "config.yaml").read_text()
    assert str(folder / "best") in run.stdout
    # a second run into the same folder is refused, not overwritten
    again = rsilora("train", "--preset", "tiny", cwd=tmp_path)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_train_rejects_bad_config_values_and_unknown_keys(tmp_path):
    bad = rsilora("train", "--preset", "tiny", "lora.r=0", "train.lr=-1", "train.lrr=1", cwd=tmp_path)
    assert bad.returncode == 2
    assert "unknown key train.lrr" in bad.stderr
    # value problems are reported once the keys are right, all together
    bad = rsilora("train", "--preset", "tiny", "lora.r=0", "train.lr=-1", cwd=tmp_path)
    assert "lora.r must be a positive integer" in bad.stderr and "train.lr must be > 0" in bad.stderr


def test_data_check_on_good_bad_and_real_data(tmp_path, synth, rsgpt):
    good = rsilora("data", "check", "--rsicap", synth.rsicap_dir, "--rsieval", synth.rsieval_dir)
    assert good.returncode == 0 and "OK: no problems found" in good.stdout
    assert f"{synth.train_images} valid records" in good.stdout

    records = [{"image_id": "0", "filename": "P0001_0001.png", "text_input": "Describe.", "text_output": ""},
               {"image_id": "1", "filename": "../x.png", "text_input": "Describe.", "text_output": "A road."}]
    folder = write_dataset(tmp_path / "bad", records, images=["P0001_0001.png"])
    bad = rsilora("data", "check", "--rsicap", folder)
    assert bad.returncode == 1
    assert "record #0" in bad.stderr and "empty caption" in bad.stderr
    assert "record #1" in bad.stderr and "escapes the images folder" in bad.stderr

    real = tmp_path / "real"
    placeholder_images(rsgpt / "RSICap" / "captions.json", real / "RSICap")
    placeholder_images(rsgpt / "RSIEval" / "annotations.json", real / "RSIEval")
    out = rsilora("data", "check", "--rsicap", real / "RSICap", "--rsieval", real / "RSIEval", "--split-by", "image")
    assert out.returncode == 0, out.stderr
    assert "2585 valid records" in out.stdout and "train 2068 images" in out.stdout and "val 517 images" in out.stdout
    assert "100 valid records (943 QA pairs)" in out.stdout and "leakage into train/val: 0" in out.stdout


def test_params_prints_the_real_counts():
    out = rsilora("params", "--arch", "flan-t5-xl", "--lora-r", 8, 16)
    assert out.returncode == 0, out.stderr
    assert "4,022,969,088" in out.stdout  # total
    assert "18,874,368" in out.stdout and "9,437,184" in out.stdout  # LoRA r=16 and r=8 on q,k,v,o
    assert out.stdout.count("288") >= 2  # modules with adapters


def test_config_prints_the_resolved_config(tmp_path):
    out = rsilora("config", "--preset", "tiny", "lora.r=4", cwd=tmp_path)
    assert out.returncode == 0 and "  r: 4" in out.stdout and "# LoRA rank." in out.stdout
