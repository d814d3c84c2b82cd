"""Evaluate captioners on RSIEval and compare them: the plan's baseline table, with honest statistics.

Each model is captioned by :mod:`rsilora.predict`, scored by :mod:`rsilora.evaluate` (BLEU-1..4,
METEOR, ROUGE-L, CIDEr with bootstrap 95 % intervals over images), and every trained model is
compared with the InstructBLIP zero-shot baseline by a paired bootstrap on the same images.

Output folder::

    comparison.json / .md / .csv      the table (see :func:`comparison_markdown`)
    <model key>/predictions.json/.csv per-image filename, prediction, reference, prompt
    <model key>/metrics.json          scores, intervals, prompt, generation settings, speed, memory
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rsilora import evaluate, results
from rsilora.data import load_rsieval
from rsilora.files import atomic_write_json, atomic_write_text, csv_text, prepare_output_dir
from rsilora.model import format_count
from rsilora.predict import default_prompt, generate_captions, load_captioner, write_predictions

TABLE_METRICS = ("BLEU-4", "CIDEr", "ROUGE-L", "METEOR")


@dataclass
class Candidate:
    """A model to evaluate, and what is known about how it was trained."""

    key: str
    label: str
    kind: str
    base: str
    weights: str | None = None
    training: str = "None"
    trial_id: str | None = None
    training_time_s: float | None = None
    training_peak_mem_gb: float | None = None


@dataclass
class Generation:
    """Generation and bootstrap settings shared by every model of a comparison."""

    prompt: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    num_beams: int = 5
    repetition_penalty: float = 1.5
    resamples: int = 1000
    seed: int = 0


def zero_shot(base: str) -> Candidate:
    return Candidate("instructblip-zero-shot", "InstructBLIP (zero-shot)", "zero-shot", base)


def blip2(base: str) -> Candidate:
    return Candidate("blip2-zero-shot", "BLIP-2 (zero-shot)", "blip2-zero-shot", base)


def from_experiment(experiment: str) -> Candidate:
    """The best trial of a Ray Tune experiment, at its best epoch."""
    top = results.best(experiment)
    if top.checkpoint is None:
        raise FileNotFoundError(f"{experiment}: the best epoch's checkpoint of trial {top.trial_id} was not kept")
    return Candidate("instructblip-lora", "InstructBLIP + LoRA", "lora", top.config["model"]["name_or_path"],
                     results.join(top.checkpoint, "weights"), "RSICap", top.trial_id, top.training_time_s,
                     top.training_peak_mem_gb)


def from_run(folder: str, base: str | None, kind: str = "lora") -> Candidate:
    """A LoRA adapter or full model folder: a run's ``best/`` or an ``rsilora export-best`` folder.

    Training time and memory come from the run's ``metrics.json`` (next to ``best/``) or the
    export's ``best.json``, when present.
    """
    folder_path = Path(folder)
    time_s = peak = trial_id = None
    run_metrics, exported = folder_path.parent / "metrics.json", folder_path / "best.json"
    if run_metrics.is_file() and (folder_path.parent / "config.yaml").is_file():
        history = json.loads(run_metrics.read_text())["history"]
        time_s = sum(h["epoch_time_s"] for h in history)
        peak = max(h["peak_mem_gb"] for h in history)
    elif exported.is_file() and "trial_id" in (info := json.loads(exported.read_text())):
        trial_id, time_s, peak = info["trial_id"], info.get("training_time_s"), info.get("training_peak_mem_gb")
    if base is None:
        config = folder_path / "adapter_config.json"
        base = json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None
    if base is None:
        raise ValueError(f"{folder}: pass --model (the base model) for this folder")
    if kind == "full":
        return Candidate("instructblip-full", "InstructBLIP (full FT)", "full", base, folder, "RSICap", trial_id,
                         time_s, peak)
    return Candidate("instructblip-lora", "InstructBLIP + LoRA", "lora", base, folder, "RSICap", trial_id,
                     time_s, peak)


def evaluate_candidate(candidate: Candidate, data_dir: str, out: Path, settings: Generation,
                       device: torch.device, verify_images: bool = True) -> dict[str, Any]:
    """Caption RSIEval with one model, score it with intervals, write its folder; returns its entry."""
    records = load_rsieval(data_dir, verify_images=verify_images).records
    prompt = settings.prompt or default_prompt(candidate.kind)
    print(f"{candidate.label}: captioning {len(records)} images ({prompt!r})", flush=True)
    captioner = load_captioner(candidate.kind, candidate.base, device, candidate.weights)
    captions, speed = generate_captions(captioner, records, prompt, device, batch_size=settings.batch_size,
                                        max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                        repetition_penalty=settings.repetition_penalty)
    folder = out / candidate.key
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder, records, captions, prompt)
    predictions = {r.filename: c for r, c in zip(records, captions)}
    references = {r.filename: [r.caption] for r in records}
    # the intervals' points are pycocoevalcap's corpus scores: no separate evaluate.score() pass
    intervals = evaluate.bootstrap_ci(predictions, references, settings.resamples, settings.seed)
    entry = {**asdict(candidate), "model": candidate.base, "adapter": candidate.weights, "prompt": prompt,
             "generation": {k: v for k, v in asdict(settings).items() if k not in ("resamples", "seed")},
             "parameters": {"total": captioner.total_params, "trainable": captioner.trainable_params},
             "scores": {m: iv.point for m, iv in intervals.items()}, "ci": {m: [iv.low, iv.high] for m, iv in intervals.items()},
             **speed, "images": len(records), "predictions": f"{candidate.key}/predictions.json"}
    atomic_write_json(folder / "metrics.json", entry)
    del captioner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def compare(candidates: list[Candidate], data_dir: str, out: str | Path, settings: Generation,
            device: torch.device, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate every candidate, pair each trained one with the zero-shot baseline, write the table."""
    out = prepare_output_dir(out, overwrite=overwrite)
    entries = [evaluate_candidate(c, data_dir, out, settings, device, verify_images=i == 0)
               for i, c in enumerate(candidates)]
    references = {r["filename"]: [r["reference"]] for r in _predictions(out, entries[0])}
    paired = []
    baseline = next((e for e in entries if e["kind"] == "zero-shot"), None)
    baseline_predictions = _as_dict(out, baseline) if baseline else {}
    for entry in entries:
        if baseline is None or entry["kind"] not in ("lora", "full"):
            continue
        differences = evaluate.paired_bootstrap(_as_dict(out, entry), baseline_predictions, references,
                                                settings.resamples, settings.seed)
        paired += [{"a": entry["key"], "b": baseline["key"], "metric": m, "difference": d.difference,
                    "ci": [d.low, d.high], "a_better_share": d.a_better_share} for m, d in differences.items()]
    comparison = {"data": str(Path(data_dir).resolve()), "images": entries[0]["images"],
                  "bootstrap": {"resamples": settings.resamples, "seed": settings.seed, "confidence": 0.95},
                  "models": entries, "paired": paired, "efficiency": efficiency(entries)}
    atomic_write_json(out / "comparison.json", comparison)
    atomic_write_text(out / "comparison.md", comparison_markdown(comparison))
    atomic_write_text(out / "comparison.csv", comparison_csv(comparison))
    return comparison


def _predictions(out: Path, entry: dict[str, Any]) -> list[dict[str, str]]:
    return json.loads((out / entry["predictions"]).read_text(encoding="utf-8"))


def _as_dict(out: Path, entry: dict[str, Any]) -> dict[str, str]:
    return {r["filename"]: r["prediction"] for r in _predictions(out, entry)}


def efficiency(entries: list[dict[str, Any]]) -> dict[str, float | None]:
    """LoRA vs full fine-tuning: trainable-parameter, training-time and training-memory ratios."""
    lora = next((e for e in entries if e["kind"] == "lora"), None)
    full = next((e for e in entries if e["kind"] == "full"), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    if lora is None or full is None:
        return {"trainable_ratio": None, "training_time_ratio": None, "memory_ratio": None}
    return {"trainable_ratio": ratio(lora["parameters"]["trainable"], full["parameters"]["trainable"]),
            "training_time_ratio": ratio(lora["training_time_s"], full["training_time_s"]),
            "memory_ratio": ratio(lora["training_peak_mem_gb"], full["training_peak_mem_gb"])}



def table_rows(comparison: dict[str, Any]) -> list[dict[str, str]]:
    """The plan's table: Model | Training | Parameters | BLEU-4 (CI) | CIDEr (CI) | ROUGE-L | METEOR | ..."""
    rows = []
    for e in comparison["models"]:
        trainable = e["parameters"]["trainable"]
        params = format_count(e["parameters"]["total"]) + (f" ({format_count(trainable)} trainable)" if trainable else "")

        def with_ci(metric: str) -> str:
            low, high = e["ci"].get(metric, [None, None])
            value = f"{e['scores'][metric]:.3f}"
            return value if low is None else f"{value} [{low:.3f}, {high:.3f}]"

        rows.append({"Model": e["label"], "Training": e["training"], "Parameters": params,
                     "BLEU-4 (95% CI)": with_ci("BLEU-4"), "CIDEr (95% CI)": with_ci("CIDEr"),
                     "ROUGE-L": f"{e['scores']['ROUGE-L']:.3f}", "METEOR": f"{e['scores']['METEOR']:.3f}",
                     "Inference time": f"{e['inference_s_per_image']:.3f} s/image",
                     "GPU memory": f"{e['peak_mem_gb']:.1f} GB" if e["peak_mem_gb"] else "CPU"})
    return rows


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The table, the paired differences against zero-shot, and the efficiency lines, as Markdown."""
    rows = table_rows(comparison)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    boot = comparison["bootstrap"]
    lines.append(f"\n{comparison['images']} images; 95 % intervals from {boot['resamples']} bootstrap resamples "
                 f"over images (seed {boot['seed']}).")
    shown = [p for p in comparison["paired"] if p["metric"] in TABLE_METRICS]
    if shown:
        lines.append("\nPaired bootstrap against zero-shot (same resampled images):\n")
        lines += [f"- {p['a']} - {p['b']}, {p['metric']}: {p['difference']:+.3f} "
                  f"[{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}], better in {p['a_better_share']:.1%} of resamples"
                  for p in shown]
    eff = comparison["efficiency"]
    if eff.get("trainable_ratio") is not None:
        lines.append(f"\nLoRA vs full fine-tuning: trainable parameters {eff['trainable_ratio']:.2%}, "
                     f"training time {_ratio(eff['training_time_ratio'])}, training memory {_ratio(eff['memory_ratio'])}.")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def comparison_csv(comparison: dict[str, Any]) -> str:
    return csv_text(table_rows(comparison))
