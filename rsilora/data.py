"""RSICap / RSIEval records: loading, validation, the train/val split and the leakage check.

Layouts, as released by RSGPT:

- RSICap:  ``captions.json`` = ``{"annotations": [{"image_id", "filename", "text_input",
  "text_output"}]}`` + ``images/``
- RSIEval: ``annotations.json`` = ``{"annotations": [{"filename", "caption", "qa_pairs":
  [{"question", "answer", "type"}]}]}`` + ``images/``

Every bad record is reported with its file and position; nothing is dropped silently. RSICap's
2,585 images are crops of 1,015 DOTA scenes (``P0378_0001.png`` is crop 1 of scene ``P0378``) and
neighbouring crops overlap, so the default split keeps each scene on one side.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rsilora.files import atomic_write_json

RSICAP_FILE = "captions.json"
RSIEVAL_FILE = "annotations.json"
_SCENE = re.compile(r"^(P\d+)_\d+")


@dataclass(frozen=True)
class CaptionRecord:
    """One image with its reference caption."""

    filename: str
    """Path relative to the dataset's ``images/`` folder, as written in the JSON."""
    image_path: Path
    """Absolute path of the image file."""
    caption: str
    """Reference caption (RSICap ``text_output`` / RSIEval ``caption``)."""
    prompt: str | None
    """The record's own instruction (RSICap ``text_input``); None for RSIEval."""
    where: str
    """Human-readable position for error messages: file and record."""
    qa_pairs: tuple[dict[str, str], ...] = ()
    """RSIEval question/answer pairs (empty for RSICap)."""


@dataclass(frozen=True)
class DataProblem:
    """A bad input, named by file and record."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class DataError(ValueError):
    """Bad dataset input; ``problems`` lists every problem found (file + record)."""

    def __init__(self, problems: list[DataProblem]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{shown}{more}")


@dataclass
class LoadedDataset:
    """Valid records of one dataset plus the bad ones that were skipped (only with skip_bad)."""

    folder: Path
    records: list[CaptionRecord]
    skipped: list[DataProblem] = field(default_factory=list)

    @property
    def filenames(self) -> list[str]:
        return [r.filename for r in self.records]


def load_rsicap(folder: str | Path, skip_bad: bool = False, verify_images: bool = True) -> LoadedDataset:
    """Load and validate RSICap (``captions.json`` + ``images/``).

    Raises :class:`DataError` listing every problem unless ``skip_bad``, in which case bad records
    are left out and returned in ``skipped``. File-level problems always raise.
    """
    fields = {"image_id": str, "filename": str, "text_input": str, "text_output": str}
    return _load(Path(folder), RSICAP_FILE, fields, "text_output", "text_input", skip_bad, verify_images)


def load_rsieval(folder: str | Path, skip_bad: bool = False, verify_images: bool = True) -> LoadedDataset:
    """Load and validate RSIEval (``annotations.json`` + ``images/``); see :func:`load_rsicap`."""
    fields = {"filename": str, "caption": str, "qa_pairs": list}
    return _load(Path(folder), RSIEVAL_FILE, fields, "caption", None, skip_bad, verify_images)


def _load(
    folder: Path,
    json_name: str,
    fields: dict[str, type],
    caption_key: str,
    prompt_key: str | None,
    skip_bad: bool,
    verify_images: bool,
) -> LoadedDataset:
    json_path, images_dir = folder / json_name, folder / "images"
    entries = _read_annotations(json_path)
    if not images_dir.is_dir():
        raise DataError([DataProblem(str(images_dir), "images folder does not exist")])
    images_root = images_dir.resolve()
    records, problems, seen = [], [], {}
    for i, entry in enumerate(entries):
        where = _describe(json_path, i, entry)
        found = _check_entry(entry, fields, caption_key, prompt_key)
        if not found:
            name = entry["filename"]
            if name in seen:
                found.append(f"duplicate filename {name!r} (also record #{seen[name]})")
            else:
                seen[name] = i
                path, message = _image_path(images_dir, images_root, name, verify_images)
                if message:
                    found.append(message)
        if found:
            problems.extend(DataProblem(where, m) for m in found)
            continue
        qa = tuple(entry.get("qa_pairs", ()))
        prompt = entry[prompt_key] if prompt_key else None
        records.append(CaptionRecord(name, path, entry[caption_key], prompt, where, qa))
    if problems and not skip_bad:
        raise DataError(problems)
    if not records:
        raise DataError(problems or [DataProblem(str(json_path), "no records")])
    return LoadedDataset(folder, records, problems)


def _read_annotations(json_path: Path) -> list[Any]:
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError([DataProblem(str(json_path), "file does not exist")]) from None
    except UnicodeDecodeError as e:
        raise DataError([DataProblem(str(json_path), f"not UTF-8 text: {e}")]) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError([DataProblem(f"{json_path}:{e.lineno}:{e.colno}", f"malformed JSON: {e.msg}")]) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise DataError([DataProblem(str(json_path), 'expected {"annotations": [...]} at the top level')])
    return raw["annotations"]


def _describe(json_path: Path, index: int, entry: Any) -> str:
    if isinstance(entry, dict):
        tags = [f"{k}={entry[k]!r}" for k in ("image_id", "filename") if isinstance(entry.get(k), str)]
        if tags:
            return f"{json_path} record #{index} ({', '.join(tags)})"
    return f"{json_path} record #{index}"


def _check_entry(entry: Any, fields: dict[str, type], caption_key: str, prompt_key: str | None) -> list[str]:
    if not isinstance(entry, dict):
        return [f"record must be an object, got {type(entry).__name__}"]
    found = []
    for key, kind in fields.items():
        if key not in entry:
            found.append(f"missing field {key!r}")
        elif not isinstance(entry[key], kind):
            found.append(f"field {key!r} must be {kind.__name__}, got {type(entry[key]).__name__}")
    if found:
        return found
    if not entry[caption_key].strip():
        found.append(f"empty caption ({caption_key!r})")
    if prompt_key and not entry[prompt_key].strip():
        found.append(f"empty instruction ({prompt_key!r})")
    if not entry["filename"].strip():
        found.append("empty filename")
    for j, qa in enumerate(entry.get("qa_pairs", ())):
        if not isinstance(qa, dict) or not all(isinstance(qa.get(k), str) for k in ("question", "answer", "type")):
            found.append(f"qa_pairs[{j}] must have string question, answer and type")
    return found


def _image_path(images_dir: Path, images_root: Path, name: str, verify: bool) -> tuple[Path, str | None]:
    """Resolve ``name`` inside the images folder; return (path, problem or None)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return relative, f"filename {name!r} escapes the images folder (absolute or '..')"
    path = images_dir / relative
    resolved = path.resolve()
    if not resolved.is_relative_to(images_root):
        return path, f"filename {name!r} is a link that leaves the images folder (to {resolved})"
    if not path.is_file():
        return path, f"image file {path} does not exist"
    if verify:
        try:
            with Image.open(path) as image:
                image.verify()  # reads the whole file: truncation and bad checksums show here
        except Exception as e:  # PIL raises many types for bad files
            return path, f"corrupt or unreadable image {path}: {e}"
    return path.absolute(), None


def open_image(record: CaptionRecord) -> Image.Image:
    """Decode a record's image as RGB; a decoding failure names the file and record."""
    try:
        with Image.open(record.image_path) as image:
            return image.convert("RGB")
    except Exception as e:
        raise DataError([DataProblem(record.where, f"cannot decode image {record.image_path}: {e}")]) from e


# --------------------------------------------------------------------------------------------
# Train/val split and leakage.


def scene_of(filename: str) -> str | None:
    """DOTA scene ID of a crop (``P0378_0001.png`` -> ``P0378``), or None when the name has none."""
    match = _SCENE.match(Path(filename).name)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Split:
    """Filenames on each side of the RSICap train/val split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    by: str
    seed: int
    val_fraction: float

    def summary(self) -> str:
        scenes = [len({scene_of(n) or n for n in side}) for side in (self.train, self.val)]
        shared = len({scene_of(n) for n in self.train} & {scene_of(n) for n in self.val} - {None})
        return (
            f"split by {self.by} (seed {self.seed}, val {self.val_fraction:.0%}): "
            f"train {len(self.train)} images / {scenes[0]} scenes, val {len(self.val)} images / "
            f"{scenes[1]} scenes, scenes on both sides: {shared}"
        )


def make_split(filenames: list[str], val_fraction: float, seed: int, by: str = "scene") -> Split:
    """Deterministic seeded split; ``by="scene"`` keeps every DOTA scene on one side.

    Groups (scenes, or single images) are shuffled with ``seed`` and moved to val until it holds
    ``round(val_fraction * N)`` images, so scene splits land within one scene of the target. The
    result depends only on the set of names, not their order in the JSON.
    """
    if by not in ("scene", "image"):
        raise ValueError(f"split by must be 'scene' or 'image', got {by!r}")
    names = sorted(set(filenames))
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[(scene_of(name) if by == "scene" else None) or name].append(name)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = round(val_fraction * len(names))
    val: list[str] = []
    for key in keys:
        if len(val) >= target:
            break
        val.extend(groups[key])
    val_set = set(val)
    train = [n for n in names if n not in val_set]
    return Split(tuple(train), tuple(sorted(val)), by, seed, val_fraction)


def split_folder(split_root: Path, by: str, val_fraction: float, seed: int) -> Path:
    """Folder of one split's lists: settings are in the name, so different settings never clash."""
    return split_root / f"{by}-val{val_fraction:g}-seed{seed}"


def load_or_create_split(
    filenames: list[str], split_root: str | Path, val_fraction: float, seed: int, by: str = "scene"
) -> tuple[Split, Path, bool]:
    """Reuse the split written under ``split_root`` for these settings, or create and write it.

    Returns ``(split, folder, created)``. An existing split must cover every current filename;
    otherwise the data changed and a :class:`DataError` says which folder to remove.
    """
    folder = split_folder(Path(split_root), by, val_fraction, seed)
    if not (folder / "split.json").is_file():
        split = make_split(filenames, val_fraction, seed, by)
        return split, folder, _write_split(split, folder)
    train = _read_list(folder / "train.txt")
    val = _read_list(folder / "val.txt")
    uncovered = sorted(set(filenames) - set(train) - set(val))
    overlap = sorted(set(train) & set(val))
    if uncovered or overlap:
        detail = f"{len(uncovered)} images not in it (e.g. {uncovered[:3]})" if uncovered else ""
        detail += f"{len(overlap)} images on both sides" if overlap else ""
        raise DataError([DataProblem(str(folder), f"saved split does not match the data: {detail}; "
                                                  "remove the folder to split again")])
    return Split(tuple(train), tuple(val), by, seed, val_fraction), folder, False


def _write_split(split: Split, folder: Path) -> bool:
    """Write the lists into a temp folder and rename it into place (safe if trials race)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    (staging / "train.txt").write_text("\n".join(split.train) + "\n", encoding="utf-8")
    (staging / "val.txt").write_text("\n".join(split.val) + "\n", encoding="utf-8")
    meta = {"by": split.by, "seed": split.seed, "val_fraction": split.val_fraction,
            "train_images": len(split.train), "val_images": len(split.val)}
    atomic_write_json(staging / "split.json", meta)
    try:
        os.rename(staging, folder)
        return True
    except OSError:  # another process wrote the same (deterministic) split first
        shutil.rmtree(staging, ignore_errors=True)
        return False


def _read_list(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def leakage_problems(split: Split, test_filenames: list[str], test_folder: str | Path) -> list[DataProblem]:
    """Test images (or their DOTA scenes) that also appear in train/val."""
    seen = set(split.train) | set(split.val)
    seen_scenes = {scene_of(n) for n in seen} - {None}
    problems = []
    for name in test_filenames:
        if name in seen:
            problems.append(DataProblem(f"{test_folder} {name}", "test image is also in RSICap train/val"))
        elif scene_of(name) in seen_scenes:
            problems.append(DataProblem(f"{test_folder} {name}",
                                        f"test image's scene {scene_of(name)} is also in RSICap train/val"))
    return problems


def select(records: list[CaptionRecord], filenames: tuple[str, ...]) -> list[CaptionRecord]:
    """Records whose filename is in ``filenames``, in the order of ``filenames``."""
    by_name = {r.filename: r for r in records}
    return [by_name[n] for n in filenames if n in by_name]


# --------------------------------------------------------------------------------------------
# Batching through the InstructBLIP processor.


class CaptionDataset(torch.utils.data.Dataset):
    """Records -> ``{"image": uint8 (3, H, W), "prompt": str, "caption": str}``.

    The prompt is ``prompt`` when given, else the record's own instruction (RSICap ``text_input``).
    """

    def __init__(self, records: list[CaptionRecord], transform, prompt: str | None = None):
        missing = [r.where for r in records if prompt is None and r.prompt is None]
        if missing:
            raise ValueError(f"{len(missing)} records have no instruction and no prompt is configured, "
                             f"e.g. {missing[0]}")
        self.records, self.transform, self.prompt = records, transform, prompt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {"image": self.transform(open_image(record)), "prompt": self.prompt or record.prompt,
                "caption": record.caption}


class CaptionCollator:
    """Batch items with the InstructBLIP processor; labels are the caption tokens padded with -100.

    The processor inserts the ``<image>`` placeholder tokens that ``forward`` replaces with the
    Q-Former output, and tokenizes the instruction for the Q-Former too: never build ids by hand.
    Images arrive already at the vision tower's size, so the processor only rescales and normalises.
    """

    def __init__(self, processor, max_prompt_tokens: int = 64, max_caption_tokens: int = 384):
        self.processor = processor
        self.max_prompt_tokens, self.max_caption_tokens = max_prompt_tokens, max_caption_tokens

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            images=[item["image"] for item in items],
            text=[item["prompt"] for item in items],
            padding="longest",
            truncation=True,
            # the processor subtracts the query tokens from max_length for the T5 prompt
            max_length=self.max_prompt_tokens + self.processor.num_query_tokens,
            do_resize=False,
            return_tensors="pt",
        )
        batch["labels"] = self.labels([item["caption"] for item in items])
        return dict(batch)

    def labels(self, captions: list[str]) -> torch.Tensor:
        """Caption token ids ``(B, T)``, padded with -100 (no loss on padding), ending in ``</s>``."""
        targets = self.processor.tokenizer(captions, padding="longest", truncation=True,
                                           max_length=self.max_caption_tokens, return_tensors="pt")
        labels = targets["input_ids"]
        labels[targets["attention_mask"] == 0] = -100
        return labels


@dataclass(frozen=True)
class CaptionLengths:
    """Caption lengths in words and tokens, and how many exceed the token cap."""

    count: int
    words_median: float
    words_max: int
    tokens_median: float
    tokens_p99: float
    tokens_max: int
    max_tokens: int
    truncated: int

    def summary(self) -> str:
        return (f"{self.count} captions: words median {self.words_median:.0f} / max {self.words_max}; "
                f"tokens median {self.tokens_median:.0f} / p99 {self.tokens_p99:.0f} / max {self.tokens_max}; "
                f"truncated at {self.max_tokens} tokens: {self.truncated}")


def caption_lengths(captions: list[str], tokenizer, max_tokens: int) -> CaptionLengths:
    """Measure captions with the model's own tokenizer (the count includes the closing ``</s>``)."""
    tokens = torch.tensor([len(ids) for ids in tokenizer(captions)["input_ids"]], dtype=torch.float)
    words = torch.tensor([len(c.split()) for c in captions], dtype=torch.float)
    return CaptionLengths(
        count=len(captions),
        words_median=float(words.median()),
        words_max=int(words.max()),
        tokens_median=float(tokens.median()),
        tokens_p99=float(torch.quantile(tokens, 0.99)),
        tokens_max=int(tokens.max()),
        max_tokens=max_tokens,
        truncated=int((tokens > max_tokens).sum()),
    )
