"""Caption-metric speed: rsilora.evaluate.score and the bootstrap, on synthetic captions.

Measures, on 1,000 and 10,000 RSIEval-like synthetic captions (one reference each, predictions are
seeded noisy copies): the whole ``score()`` call and each part of it separately (PTB tokenizer, BLEU,
METEOR, ROUGE-L, CIDEr); the METEOR Java start-up (paraphrase table) is timed once on its own and is
not in the other figures. Then ``bootstrap_ci`` and ``paired_bootstrap`` with 1,000 resamples on 100
captions, and the resampling alone. Takes a few minutes (METEOR on 10,000 captions dominates).

    .venv/bin/python bench/metrics_speed.py [--sizes 1000 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from rsilora import evaluate as ev
from rsilora.files import atomic_write_json
from rsilora.synth import caption_corpus

FILLER = "the a of large small several near some image area".split()


def synthetic(n: int, seed: int = 0, noise: float = 0.3) -> tuple[dict[str, str], dict[str, list[str]]]:
    """n captions as references; predictions drop or replace each word with probability ``noise``."""
    rng = np.random.default_rng(seed)
    refs = {f"{i:05d}.png": [c] for i, c in enumerate(caption_corpus(n, seed)[:n])}
    preds = {}
    for key, (ref,) in refs.items():
        u = rng.random(len(ref.split()))
        words = [str(rng.choice(FILLER)) if x < noise else w for w, x in zip(ref.split(), u) if x >= noise / 2]
        preds[key] = " ".join(words)
    return preds, refs


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def bleu(gts: dict, res: dict):
    with contextlib.redirect_stdout(io.StringIO()):
        return Bleu(4).compute_score(gts, res)


def score_parts(n: int) -> dict[str, float]:
    """Seconds for score() and for each of its parts on n captions (METEOR already started)."""
    preds, refs = synthetic(n)
    ids = list(preds)
    figures = {"score": timed(ev.score, preds, refs)[0]}
    figures["tokenizer"], (gts, (res,)) = timed(ev._tokenize_sets, refs, [preds], ids)
    figures["BLEU"] = timed(bleu, gts, res)[0]
    figures["METEOR"] = timed(ev._meteor_scores, gts, res)[0]
    figures["ROUGE-L"] = timed(Rouge().compute_score, gts, res)[0]
    figures["CIDEr"] = timed(Cider().compute_score, gts, res)[0]
    return figures


def bootstrap_figures(n: int, resamples: int) -> dict[str, float]:
    """Seconds for bootstrap_ci / paired_bootstrap on n captions, and for the resampling alone."""
    preds, refs = synthetic(n, seed=1)
    worse, _ = synthetic(n, seed=2, noise=0.5)
    ids = list(preds)
    figures = {"bootstrap_ci": timed(ev.bootstrap_ci, preds, refs, resamples)[0],
               "paired_bootstrap": timed(ev.paired_bootstrap, preds, worse, refs, resamples)[0]}
    gts, (res,) = ev._tokenize_sets(refs, [preds], ids)
    metrics = (*ev.METRICS[:4], "ROUGE-L", "CIDEr")  # METEOR's resample is a mean, like ROUGE-L's
    prep = ev._prepare(gts, res, ids, metrics)
    figures["resampling only"] = timed(ev._resample_scores, prep, ev._draw(n, resamples, 0, 0.95), metrics)[0]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="captions per score() run")
    parser.add_argument("--bootstrap-size", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ev.check_java()
    ev._close_meteor()
    startup = timed(ev._meteor_scores, {"w": ["warm up"]}, {"w": ["warm up"]})[0]
    print(f"METEOR Java start-up (paraphrase table): {startup:.2f} s (excluded below)\n")
    results: dict[str, object] = {"meteor_startup_s": startup, "score_s": {}}
    parts = ["score", "tokenizer", "BLEU", "METEOR", "ROUGE-L", "CIDEr"]
    print(f"{'captions':>9} " + " ".join(f"{p:>10}" for p in parts) + "   (seconds)")
    for n in args.sizes:
        figures = score_parts(n)
        results["score_s"][str(n)] = figures
        print(f"{n:>9} " + " ".join(f"{figures[p]:>10.2f}" for p in parts), flush=True)
    boot = bootstrap_figures(args.bootstrap_size, args.resamples)
    results["bootstrap_s"] = {"captions": args.bootstrap_size, "resamples": args.resamples, **boot}
    print(f"\n{args.resamples} resamples on {args.bootstrap_size} captions (seconds):")
    for name, seconds in boot.items():
        print(f"  {name:<17} {seconds:>7.2f}")
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
