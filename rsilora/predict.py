"""Caption generation for evaluation: load a captioner, caption every RSIEval image in batches.

Captioners: the base InstructBLIP zero-shot, the base + a LoRA adapter (a run's ``best/``, an
``rsilora export-best`` folder, or an experiment's best checkpoint), a full-fine-tuning checkpoint,
or BLIP-2 zero-shot. Images go through the same deterministic resize and processor normalisation
as validation images in training. Scores are computed by :mod:`rsilora.evaluate` (pure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
)

from rsilora.augment import eval_transform
from rsilora.data import CaptionRecord, open_image
from rsilora.files import atomic_write_json, atomic_write_text, csv_text
from rsilora.model import check_model_path, compute_dtype, count_parameters, image_size, load_processor

KINDS = ("zero-shot", "lora", "full", "blip2-zero-shot")
FINE_TUNED_PROMPT = "Describe this image in detail."  # one of RSICap's own training instructions
ZERO_SHOT_PROMPT = "Describe this aerial/satellite image in detail:"  # the plan's zero-shot prompt


def default_prompt(kind: str) -> str:
    """Ask fine-tuned models what training taught them; zero-shot models get the plan's prompt."""
    return FINE_TUNED_PROMPT if kind in ("lora", "full") else ZERO_SHOT_PROMPT


@dataclass
class Captioner:
    """A loaded model + processor ready for ``generate``, and its parameter counts."""

    model: Any
    processor: Any
    total_params: int
    trainable_params: int


def load_captioner(kind: str, base: str, device: torch.device, weights: str | None = None) -> Captioner:
    """Load one of :data:`KINDS`.

    ``base`` is the base model (hub name or folder; its processor is used in every case).
    ``weights``: the LoRA adapter folder for ``lora``, the fine-tuned model folder for ``full``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind in ("lora", "full") and weights is None:
        raise ValueError(f"kind={kind} needs the fine-tuned weights folder")
    dtype = compute_dtype(device)
    check_model_path(base)
    if kind == "blip2-zero-shot":
        return _ready(Blip2ForConditionalGeneration.from_pretrained(base, dtype=dtype),
                      Blip2Processor.from_pretrained(base), device, trainable=0)
    processor = load_processor(base)
    if kind == "full":
        network = InstructBlipForConditionalGeneration.from_pretrained(weights, dtype=dtype)
        return _ready(network, processor, device, trainable=count_parameters(network).total)
    network = InstructBlipForConditionalGeneration.from_pretrained(base, dtype=dtype)
    if kind == "zero-shot":
        return _ready(network, processor, device, trainable=0)
    network = PeftModel.from_pretrained(network, weights)
    lora = count_parameters(network).lora
    # merged, it is a plain model again: generation as fast as the base
    return _ready(network.merge_and_unload(), processor, device, trainable=lora, extra=lora)


def _ready(network, processor, device: torch.device, trainable: int, extra: int = 0) -> Captioner:
    network = network.to(device).eval()
    return Captioner(network, processor, sum(p.numel() for p in network.parameters()) + extra, trainable)


@torch.no_grad()
def generate_captions(captioner: Captioner, records: list[CaptionRecord], prompt: str, device: torch.device, *,
                      batch_size: int = 8, max_new_tokens: int = 256, num_beams: int = 5,
                      repetition_penalty: float = 1.5, progress: bool = False) -> tuple[list[str], dict[str, float]]:
    """Caption ``records`` in batches; returns the captions and timing/memory figures.

    The first batch is generated once more untimed as warm-up; ``inference_s_per_image`` is the
    timed wall time over all images divided by their number.
    """
    transform = eval_transform(image_size(captioner.processor))

    def batch_inputs(chunk: list[CaptionRecord]) -> dict[str, torch.Tensor]:
        images = [transform(open_image(r)) for r in chunk]
        inputs = captioner.processor(images=images, text=[prompt] * len(chunk), padding="longest",
                                     do_resize=False, return_tensors="pt")
        return {k: v.to(device) for k, v in inputs.items()}

    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, repetition_penalty=repetition_penalty,
                    do_sample=False)
    chunks = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    captioner.model.generate(**batch_inputs(chunks[0]), **settings)  # warm-up: kernels, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    captions: list[str] = []
    start = time.perf_counter()
    for i, chunk in enumerate(chunks):
        out = captioner.model.generate(**batch_inputs(chunk), **settings)
        captions += [c.strip() for c in captioner.processor.batch_decode(out, skip_special_tokens=True)]
        if progress:
            print(f"  captioned {min((i + 1) * batch_size, len(records))}/{len(records)}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return captions, {"inference_s_per_image": elapsed / len(records), "images_per_s": len(records) / elapsed,
                      "peak_mem_gb": peak}


def write_predictions(folder: Path, records: list[CaptionRecord], captions: list[str], prompt: str) -> None:
    """predictions.json and predictions.csv: filename, prediction, reference, prompt."""
    rows = [{"filename": r.filename, "prediction": c, "reference": r.caption, "prompt": prompt}
            for r, c in zip(records, captions)]
    atomic_write_json(folder / "predictions.json", rows)
    atomic_write_text(folder / "predictions.csv", csv_text(rows))

