"""Session-scoped fixtures: the synthetic datasets and the tiny model are built once per run."""

from __future__ import annotations

import json
import os
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
