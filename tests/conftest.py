"""Session-scoped fixtures: the synthetic datasets and the tiny model are built once per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rsilora.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_RSGPT = REPO.parent / "shared" / "data" / "rsgpt"


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Small RSICap/RSIEval-format synthetic datasets (the embedded default data)."""
    from rsilora.synth import write_synthetic_datasets

    return write_synthetic_datasets(tmp_path_factory.mktemp("synth"), train_images=40, test_images=8,
                                    seed=0, image_size=128)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight InstructBLIP + processor, saved like a hub model."""
    from rsilora.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-instructblip", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from rsilora.model import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="session")
def rsgpt() -> Path:
    """The real RSICap/RSIEval annotation files (no images); skipped where ../shared is absent."""
    if not (SHARED_RSGPT / "RSICap" / "captions.json").is_file():
        pytest.skip("real RSGPT annotations not available (../shared/data/rsgpt)")
    return SHARED_RSGPT


@pytest.fixture
def make_config(synth, tiny_model_dir, tmp_path):
    """Build a validated tiny-preset Config pointing at the session fixtures; extra overrides win."""

    def make(*overrides: str, **kwargs):
        base = [f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
                f"data.split_dir={tmp_path / 'splits'}", f"model.name_or_path={tiny_model_dir}",
                f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.epochs=2",
                "train.batch_size=4"]
        return load_config(overrides=base + list(overrides), preset="tiny", base_dir=tmp_path, **kwargs)

    return make


def write_dataset(folder: Path, records: list[dict], kind: str = "rsicap", images: list[str] | None = None,
                  size: int = 16) -> Path:
    """Write a hand-made dataset: JSON records + small PNGs for ``images`` (default: every filename)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = images if images is not None else [r["filename"] for r in records if isinstance(r, dict)]
    for name in names:
        path = folder / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (90, 120, 60)).save(path)
    json_name = "captions.json" if kind == "rsicap" else "annotations.json"
    (folder / json_name).write_text(json.dumps({"annotations": records}), encoding="utf-8")
    return folder


def placeholder_images(annotation_file: Path, folder: Path, key: str = "annotations") -> Path:
    """Copy a real annotation file beside placeholder images for its real filenames."""
    entries = json.loads(annotation_file.read_text(encoding="utf-8"))[key]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tile = folder / ".tile.png"
    Image.new("RGB", (8, 8), (100, 100, 100)).save(tile)
    data = tile.read_bytes()
    for entry in entries:
        (folder / "images" / entry["filename"]).write_bytes(data)
    os.remove(tile)
    (folder / annotation_file.name).write_bytes(annotation_file.read_bytes())
    return folder


# --- a real tiny experiment and an evaluation folder (report and notebook tests) -------------


def build_experiment(storage: Path, synth, tiny_model_dir) -> Path:
    """Run stage 1 (plan space, ASHA, tiny preset) in a subprocess with its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "tune_jobs/stage1.py", "--preset", "tiny", "--space", "plan", "--scheduler", "asha",
                    "--storage", str(storage), "--name", "s1", f"data.rsicap_dir={synth.rsicap_dir}",
                    f"data.rsieval_dir={synth.rsieval_dir}", f"data.split_dir={storage}/splits",
                    f"model.name_or_path={tiny_model_dir}", "train.progress=false",
                    "train.early_stopping_patience=null"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return storage / "s1"


def write_comparison(folder: Path, rsieval_dir: Path, lora_trial_id: str | None) -> Path:
    """An evaluation folder in the evaluation module's format, with real RSIEval filenames and captions."""
    records = json.loads((Path(rsieval_dir) / "annotations.json").read_text())["annotations"]
    ci = lambda *pairs: dict(zip(("BLEU-4", "CIDEr", "ROUGE-L"), pairs))  # noqa: E731
    models = [
        _model("instructblip-zero-shot", "InstructBLIP (zero-shot)", "zero-shot", None, 0, None,
               (0.08, 0.05, 0.25), ci([0.06, 0.10], [0.03, 0.07], [0.23, 0.27])),
        _model("blip2-zero-shot", "BLIP-2 (zero-shot)", "blip2-zero-shot", None, 0, None,
               (0.06, 0.04, 0.22), ci([0.05, 0.08], None, [0.20, 0.24])),  # no CIDEr CI: no whisker
        _model("instructblip-lora", "InstructBLIP + LoRA", "lora", lora_trial_id, 18874368, 9720.0,
               (0.21, 0.31, 0.41), ci([0.18, 0.24], [0.25, 0.37], [0.38, 0.44])),
        _model("instructblip-full", "InstructBLIP (full FT)", "full", None, 4022969088, 45000.0,
               (0.22, 0.33, 0.42), {}),
    ]
    for i, model in enumerate(models):
        (folder / model["key"]).mkdir(parents=True)
        preds = [{"filename": r["filename"], "reference": r["caption"], "prompt": "Describe this image:",
                  "prediction": " ".join(r["caption"].split()[i * 3:])} for r in records]
        (folder / model["predictions"]).write_text(json.dumps(preds))
        (folder / model["key"] / "metrics.json").write_text(json.dumps(model))
    comparison = {"data": str(rsieval_dir), "images": len(records),
                  "bootstrap": {"resamples": 1000, "seed": 0, "confidence": 0.95}, "models": models,
                  "paired": [{"a": "instructblip-lora", "b": "instructblip-zero-shot", "metric": "CIDEr",
                              "difference": 0.26, "ci": [0.2, 0.32], "a_better_share": 0.999}],
                  "efficiency": {"trainable_ratio": 0.0047, "training_time_ratio": 0.22, "memory_ratio": None}}
    (folder / "comparison.json").write_text(json.dumps(comparison))
    header = "| Model | Training | Parameters | RSIEval BLEU-4 | RSIEval CIDEr |\n| --- | --- | --- | --- | --- |\n"
    rows = "".join(f"| {m['label']} | {m['training']} | {m['parameters']['total']} | {m['scores']['BLEU-4']} | "
                   f"{m['scores']['CIDEr']} |\n" for m in models)
    (folder / "comparison.md").write_text("# Comparison\n\n" + header + rows)
    return folder


def _model(key, label, kind, trial_id, trainable, train_s, scores, ci) -> dict:
    names = ("BLEU-4", "CIDEr", "ROUGE-L")
    return {"key": key, "label": label, "kind": kind, "training": "RSICap" if train_s else "None",
            "model": "Salesforce/instructblip-flan-t5-xl", "adapter": None, "trial_id": trial_id,
            "prompt": "Describe this image:", "parameters": {"total": 4022969088 + trainable, "trainable": trainable},
            "scores": {"BLEU-1": 0.3, "BLEU-2": 0.2, "BLEU-3": 0.1, "METEOR": 0.1, **dict(zip(names, scores))},
            "ci": {k: v for k, v in ci.items() if v}, "inference_s_per_image": 1.3, "peak_mem_gb": 9.2,
            "training_time_s": train_s, "training_peak_mem_gb": 10.1 if train_s else None,
            "predictions": f"{key}/predictions.json"}


@pytest.fixture(scope="session")
def tiny_experiment(synth, tiny_model_dir, tmp_path_factory) -> Path:
    """A real stage-1 experiment on the tiny preset (5 trials, ASHA), built once per session."""
    return build_experiment(tmp_path_factory.mktemp("tune"), synth, tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_eval_dir(tiny_experiment, synth, tmp_path_factory) -> Path:
    """A comparison folder whose LoRA model is the experiment's best trial (real-size numbers)."""
    from rsilora import results

    top = results.best(tiny_experiment)
    return write_comparison(tmp_path_factory.mktemp("eval"), synth.rsieval_dir, top.trial_id)
