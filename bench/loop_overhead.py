"""Training-loop overhead: rsilora's ``train_one_epoch`` against a bare PyTorch loop.

Same tiny model, same pre-collated batches, same optimizer, scheduler and clipping; the two loops
alternate over several rounds and the medians are compared. Goal: ratio <= 1.05.

    .venv/bin/python bench/loop_overhead.py [--steps 30] [--rounds 5] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsilora.augment import eval_transform
from rsilora.data import CaptionCollator, CaptionDataset, load_rsicap
from rsilora.model import load_model, load_processor, prepare_model, quiet_libraries
from rsilora.synth import write_synthetic_datasets
from rsilora.tiny import write_tiny_model
from rsilora.train import build_optimizer, build_scheduler, train_one_epoch


def bare_loop(model, batches, optimizer, scheduler) -> None:
    """The loop a tutorial writes: forward, mean loss, backward, clip, step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        synth = write_synthetic_datasets(Path(tmp) / "data", args.batch_size * 4, 1, image_size=128)
        model_dir = write_tiny_model(Path(tmp) / "tiny")
        processor = load_processor(str(model_dir))
        records = load_rsicap(synth.rsicap_dir).records
        dataset = CaptionDataset(records, eval_transform(224))
        collate = CaptionCollator(processor)
        pool = [collate([dataset[(i * args.batch_size + j) % len(dataset)] for j in range(args.batch_size)])
                for i in range(4)]
        batches = [pool[i % len(pool)] for i in range(args.steps)]
        model = prepare_model(load_model(str(model_dir), torch.device("cpu")), "lora", r=16, alpha=32)
        optimizer = build_optimizer(model, 1e-4, 0.0)
        scheduler = build_scheduler(optimizer, "cosine", 0, 10**9)
        cpu = torch.device("cpu")

        def ours():
            train_one_epoch(model, batches, optimizer, scheduler, cpu, grad_accum=1, max_grad_norm=1.0)

        def bare():
            bare_loop(model, batches, optimizer, scheduler)

        ours(), bare()  # warm-up
        times = {"rsilora": [], "bare": []}
        for _ in range(args.rounds):
            for name, fn in (("rsilora", ours), ("bare", bare)):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / args.steps)
    step = {k: statistics.median(v) for k, v in times.items()}
    ratio = step["rsilora"] / step["bare"]
    print(f"{'loop':<10}{'step time (median)':>20}")
    for name, t in step.items():
        print(f"{name:<10}{t * 1000:>17.2f} ms")
    print(f"ratio rsilora / bare: {ratio:.3f}  (goal <= 1.05)  [batch {args.batch_size}, {args.steps} steps x "
          f"{args.rounds} rounds, tiny model, CPU]")
    if args.json:
        args.json.write_text(json.dumps({"loop_step_s": step, "loop_overhead_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
