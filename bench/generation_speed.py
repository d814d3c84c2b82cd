"""Batched caption generation against the plan's one-image-at-a-time loop, on the tiny model (CPU).

Same images, prompt and generation settings (greedy, 48 new tokens); the two loops alternate over
several rounds and the medians of images/s are compared. Goal: batched >= 3x.

    .venv/bin/python bench/generation_speed.py [--images 32] [--batch-size 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from rsilora.data import load_rsieval
from rsilora.model import quiet_libraries
from rsilora.predict import ZERO_SHOT_PROMPT, generate_captions, load_captioner
from rsilora.synth import write_synthetic_datasets
from rsilora.tiny import write_tiny_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_libraries()
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        synth = write_synthetic_datasets(Path(tmp) / "data", 1, args.images, image_size=128)
        captioner = load_captioner("zero-shot", str(write_tiny_model(Path(tmp) / "tiny")), cpu)
        records = load_rsieval(synth.rsieval_dir).records
        settings = dict(max_new_tokens=args.max_new_tokens, num_beams=1, repetition_penalty=1.0)
        rates = {"batched": [], "one at a time": []}
        for _ in range(args.rounds):
            for name, batch in (("batched", args.batch_size), ("one at a time", 1)):
                _, speed = generate_captions(captioner, records, ZERO_SHOT_PROMPT, cpu, batch_size=batch, **settings)
                rates[name].append(speed["images_per_s"])
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = median["batched"] / median["one at a time"]
    for name, rate in median.items():
        print(f"{name:<15}{rate:>10.1f} images/s")
    print(f"batched / one at a time: {ratio:.2f}x  (goal >= 3)  [batch {args.batch_size}, {args.images} images, "
          f"greedy {args.max_new_tokens} tokens, tiny model, CPU]")
    if args.json:
        args.json.write_text(json.dumps({"generation_images_per_s": median, "generation_batched_ratio": ratio},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
