"""Frozen-vision feature cache: compute the vision tower once per (image, view), reuse it everywhere.

With LoRA on the language model only, the ViT's output for an image depends only on the image
and its preprocessing, yet a plain loop recomputes it every epoch of every trial (ViT-g is about
1 B of InstructBLIP's 4 B parameters). Here each training image gets ``views`` augmented views,
drawn once with a fixed seed (one is sampled per epoch), and each validation image its one
deterministic view; their tower outputs, ``(views, 257, 1408)`` at fp16 for ViT-g (0.72 MB a
view), are stored as one safetensors file per image under::

    <cache root>/<model key>/<preprocessing key>/{train,eval}/<image sha256>.safetensors

The model key fingerprints the tower's weights (and the model name), the preprocessing key the
transform settings and view seed, the file name the image's bytes: any change is a different
path, so stale features are never reused. Files are written atomically, so an interrupted build
resumes and trials on shared storage can share one cache.

During training the tower is replaced by :class:`FeatureLookup`, which returns the cached
features passed in as ``pixel_values``: the Q-Former, projection and language model run
unchanged, and the tower leaves the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rsilora.augment import build_transform
from rsilora.data import CaptionCollator, CaptionRecord, open_image
from rsilora.files import atomic_write_bytes

@dataclass(frozen=True)
class FeatureCache:
    """Where one model's features for one preprocessing setting live."""

    folder: Path
    views: int
    size: int
    augment: bool
    aug_prob: float
    seed: int

    def path(self, record: CaptionRecord, train: bool) -> Path:
        """Augmented training views and the deterministic view live apart: the split may change."""
        views = "train" if train and self.augment else "eval"
        return self.folder / views / f"{file_sha256(record.image_path)}.safetensors"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tower_fingerprint(vision_model: torch.nn.Module, name: str) -> str:
    """Cheap but weight-sensitive key: every tensor's shape, sum, absolute sum and first values."""
    digest = hashlib.sha256(name.encode())
    with torch.no_grad():
        for key, tensor in sorted(vision_model.state_dict().items()):
            t = tensor.detach().float()
            stats = [t.sum().item(), t.abs().sum().item(), *t.flatten()[:16].tolist()]
            digest.update(f"{key}{tuple(t.shape)}{stats}".encode())
    return digest.hexdigest()[:16]


def cache_for(root: str | Path, vision_model: torch.nn.Module, model_name: str, image_processor: Any, size: int,
              views: int, augment: bool, aug_prob: float, seed: int) -> FeatureCache:
    """The cache folder for this tower and preprocessing (created on first use)."""
    views = views if augment else 1
    settings = {"size": size, "views": views, "augment": augment, "aug_prob": aug_prob, "seed": seed,
                "mean": list(image_processor.image_mean), "std": list(image_processor.image_std)}
    preprocess = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root) / tower_fingerprint(vision_model, model_name) / preprocess
    return FeatureCache(folder, views, size, augment, aug_prob, seed)


def render_views(cache: FeatureCache, record: CaptionRecord, train: bool) -> list[torch.Tensor]:
    """The image's views as uint8 ``(3, size, size)`` tensors, the same on every run.

    Training views are augmented with a RNG seeded from (cache seed, image bytes, view index);
    the validation view is the deterministic resize.
    """
    image = open_image(record)
    if not train or not cache.augment:
        return [build_transform(False, cache.size)(image)]
    transform = build_transform(True, cache.size, True, cache.aug_prob)
    image_key = file_sha256(record.image_path)
    views = []
    for view in range(cache.views):
        seed = int(hashlib.sha256(f"{cache.seed}:{image_key}:{view}".encode()).hexdigest()[:15], 16)
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from the global RNG
            torch.manual_seed(seed)
            views.append(transform(image))
    return views


@torch.no_grad()
def build_cache(cache: FeatureCache, records: list[CaptionRecord], vision_model: torch.nn.Module,
                image_processor: Any, device: torch.device, train: bool, batch_size: int = 32,
                progress: bool = True) -> int:
    """Compute and store the features of every record not cached yet; returns the views computed.

    Batched over views of several images; each image's file is written atomically when done, so
    an interrupted build resumes where it stopped.
    """
    views_each = cache.views if train and cache.augment else 1
    todo = [r for r in records if not _complete(cache.path(r, train), views_each)]
    if not todo:
        return 0
    tokens, hidden = _output_shape(vision_model, cache.size)
    size_gb = len(todo) * views_each * tokens * hidden * 2 / 2**30
    print(f"feature cache: {len(todo)} images x {views_each} views = {size_gb:.2f} GB at fp16 in {cache.folder}",
          flush=True)
    dtype = next(vision_model.parameters()).dtype
    computed = 0
    bar = tqdm(total=len(todo), desc="vision features", unit="image", disable=not progress)
    per_batch = max(1, batch_size // views_each)
    for start in range(0, len(todo), per_batch):
        chunk = todo[start:start + per_batch]
        images = [view for record in chunk for view in render_views(cache, record, train)]
        pixels = image_processor(images, do_resize=False, return_tensors="pt")["pixel_values"]
        features = vision_model(pixel_values=pixels.to(device, dtype)).last_hidden_state  # (N, 257, 1408)
        features = features.to(torch.float16).cpu().view(len(chunk), views_each, *features.shape[1:])
        for record, stack in zip(chunk, features):
            _save(cache.path(record, train), stack)
        computed += len(images)
        bar.update(len(chunk))
    bar.close()
    return computed


def _output_shape(vision_model: torch.nn.Module, size: int) -> tuple[int, int]:
    config = vision_model.config
    return (size // config.patch_size) ** 2 + 1, config.hidden_size


def _complete(path: Path, views: int) -> bool:
    """Whether ``path`` holds at least ``views`` views (reads the header only)."""
    if not path.is_file():
        return False
    try:  # a truncated or foreign file is recomputed, never trusted
        with safe_open(path, framework="pt") as f:
            return f.get_slice("views").get_shape()[0] >= views
    except Exception:
        return False


def _save(path: Path, views: torch.Tensor) -> None:
    atomic_write_bytes(path, save({"views": views.contiguous()}))


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Records -> ``{"features": (257, 1408) fp16, "prompt", "caption"}`` from the cache.

    Training draws one of the image's views per access from the global torch RNG, which the loop
    reseeds every epoch: a different view each epoch, the same on a resumed run.
    """

    def __init__(self, records: list[CaptionRecord], cache: FeatureCache, train: bool, prompt: str | None = None):
        self.records, self.cache, self.train, self.prompt = records, cache, train, prompt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        with safe_open(self.cache.path(record, self.train), framework="pt") as f:
            views = f.get_slice("views")  # reads the header only
            view = int(torch.randint(views.get_shape()[0], ())) if self.train else 0
            features = views[view]  # (257, 1408) fp16: one view read of the K stored
        return {"features": features, "prompt": self.prompt or record.prompt, "caption": record.caption}


class CachedFeatureCollator(CaptionCollator):
    """Like :class:`CaptionCollator`, with cached tower outputs in ``pixel_values``.

    The text goes through the same processor; the ``<image>`` placeholders the processor would
    insert for images are prepended the way the processor does it (tested to be identical).
    """

    @cached_property
    def image_ids(self) -> torch.Tensor:
        """The ``(1, num_query_tokens)`` ``<image>`` placeholder ids, tokenized once."""
        processor = self.processor
        return processor.tokenizer(processor.image_token.content * processor.num_query_tokens,
                                   add_special_tokens=False, return_tensors="pt")["input_ids"]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        processor = self.processor
        batch = processor(text=[item["prompt"] for item in items], padding="longest", truncation=True,
                          max_length=self.max_prompt_tokens + processor.num_query_tokens, return_tensors="pt")
        image_ids = self.image_ids
        n = len(items)
        batch["input_ids"] = torch.cat([image_ids.expand(n, -1), batch["input_ids"]], dim=1)
        batch["attention_mask"] = torch.cat([torch.ones_like(image_ids).expand(n, -1), batch["attention_mask"]], 1)
        batch["pixel_values"] = torch.stack([item["features"] for item in items])  # (B, 257, 1408) fp16
        batch["labels"] = self.labels([item["caption"] for item in items])
        return dict(batch)


class FeatureLookup(torch.nn.Module):
    """Stands in for the frozen vision tower: its input already is the tower's output."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.config, self.dtype = config, dtype

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        features = pixel_values.to(self.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=features[:, 0])


def base_model(model) -> torch.nn.Module:
    """The InstructBLIP model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_cached_features(model) -> torch.nn.Module:
    """Replace the (PEFT-wrapped) model's vision tower by :class:`FeatureLookup`; returns the tower."""
    base = base_model(model)
    tower = base.vision_model
    dtype = next(tower.parameters()).dtype
    base.vision_model = FeatureLookup(tower.config, dtype)
    return tower
