"""The frozen-vision feature cache, side by side with the plain loop: epoch time, a sweep, the loader.

All on a small InstructBLIP whose vision : language FLOP ratio per training image matches
flan-t5-xl's (counted by ``bench/gpu_real_size.py``'s ``flops_per_image``: 1 : 2.3 at 16 prompt +
96 caption tokens): ViT 192 x 4 layers on 257 tokens (patch 14 at 224 px), Q-Former 64 x 2 with
32 queries, T5 256 x 4+4 layers (gated FFN, d_ff 512), random weights (no language
pre-training: it does not change the step time). Data: synthetic RSICap scenes at 224 px.

a. Epoch time with and without the cache: ``rsilora.run.run_training`` (preset tiny, 2 epochs)
   with ``data.feature_cache=false`` and ``=true``, alternating for 3 rounds (each cached run
   builds a fresh cache); the medians of epoch 2's ``epoch_time_s`` (train + val) from
   metrics.json are compared. The cache is built before the loop: its build time is reported on
   its own (timed inside ``run_training``), with each run's time outside its epochs. Goal: the
   cached epoch >= 1.4x faster.
b. A stage-1-style sweep: LoRA r in {4, 8, 16, 32} (alpha 2r), 2 epochs each, trials run one
   after another in this process with ``run_training``, with and without the cache (a fresh cache
   folder, shared by the trials): total time and vision-tower forward passes, counted in images
   by wrapping ``InstructBlipVisionModel.forward``. Goal: with the cache, one forward per image
   view for the whole sweep (train images x cache_views + val images).
c. Data pipeline rate: decoded + augmented images/s from the training DataLoader (the real
   ``CaptionDataset`` + ``train_transform`` + ``CaptionCollator``, batch 8) with 0, 1 and 2 workers
   (and the cached-feature loader's), against the images/s one training step consumes (a few
   ``train_one_epoch`` steps on pre-collated batches). Loaders are timed alone, after one warm-up
   pass: on 2 cores, workers compete with the training threads in a real run.

Everything runs on the CPU with ``data.num_workers=0`` (the tiny preset), on 120 synthetic images
(about 96 train + 24 val), in about 3 minutes on 2 cores.

    .venv/bin/python bench/feature_cache.py [--train-images 120] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.models.instructblip import modeling_instructblip

from rsilora import features
from rsilora import run as rsrun
from rsilora.augment import eval_transform, train_transform
from rsilora.config import load_config
from rsilora.data import CaptionCollator, CaptionDataset
from rsilora.model import flan_t5_xl_config, load_model, prepare_model, quiet_libraries
from rsilora.synth import write_synthetic_datasets
from rsilora.tiny import build_tiny
from rsilora.train import build_optimizer, build_scheduler, train_one_epoch

# Sized so that vision : (Q-Former + T5 forward + backward) per training image is flan-t5-xl's.
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
              image_size=224, patch_size=14, initializer_range=0.02)  # 16 x 16 patches + CLS = 257 tokens
QFORMER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               cross_attention_frequency=2, max_position_embeddings=128, initializer_range=0.02)
TEXT = dict(model_type="t5", d_model=256, d_ff=512, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
NUM_QUERY_TOKENS = 32
SWEEP_RANKS = (4, 8, 16, 32)
BATCH = 8  # the tiny preset's train.batch_size


def _gpu_bench():
    """``bench/gpu_real_size.py`` as a module (its FLOP counter is shared)."""
    spec = importlib.util.spec_from_file_location("gpu_real_size", Path(__file__).with_name("gpu_real_size.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_small(seed: int = 0):
    """``rsilora.tiny.build_tiny`` with the sizes above: ``(model, processor)``, random weights."""
    return build_tiny(seed, vision=VISION, qformer=QFORMER, text=TEXT, num_query_tokens=NUM_QUERY_TOKENS,
                      pretrain=False)


def padded_tokens(records, processor) -> tuple[float, float]:
    """Mean T5 prompt and caption lengths per image as padded in batches of ``BATCH`` (what the step computes)."""
    collate = CaptionCollator(processor, 64, 256)
    prompts, captions = [], []
    for start in range(0, len(records), BATCH):
        chunk = records[start:start + BATCH]
        ids = processor.tokenizer([r.prompt for r in chunk], padding="longest", return_tensors="pt")["input_ids"]
        prompts += [ids.shape[1]] * len(chunk)
        captions += [collate.labels([r.caption for r in chunk]).shape[1]] * len(chunk)
    return statistics.mean(prompts), statistics.mean(captions)


class VisionCounter:
    """Counts images through ``InstructBlipVisionModel.forward`` while active (class-level wrapper)."""

    def __init__(self):
        self.images = 0

    def __enter__(self):
        cls = modeling_instructblip.InstructBlipVisionModel
        self._original = original = cls.forward
        counter = self

        def forward(module, pixel_values=None, *args, **kwargs):
            if pixel_values is not None:
                counter.images += int(pixel_values.shape[0])
            return original(module, pixel_values, *args, **kwargs)

        cls.forward = forward
        return self

    def __exit__(self, *exc):
        modeling_instructblip.InstructBlipVisionModel.forward = self._original


class CacheTimer:
    """Times ``rsilora.run.cache_features`` inside ``run_training`` and keeps the cache it returns."""

    def __init__(self):
        self.seconds, self.cache = 0.0, None

    def __enter__(self):
        self._original = original = rsrun.cache_features

        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.cache = original(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return self.cache

        rsrun.cache_features = timed
        return self

    def __exit__(self, *exc):
        rsrun.cache_features = self._original


def train(root: Path, synth, model_dir: Path, name: str, cache: bool, cache_dir: Path, *extra: str) -> dict:
    """One ``run_training`` (its chatter captured); wall time, epoch times, vision forwards, cache build."""
    out = root / "runs" / name
    config = load_config(overrides=[
        f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
        f"data.split_dir={root / 'splits'}", f"model.name_or_path={model_dir}", f"train.output_dir={out}",
        "train.epochs=2", "train.progress=false", "train.early_stopping_patience=null",
        f"data.feature_cache={str(cache).lower()}", f"data.feature_cache_dir={cache_dir}", *extra,
    ], preset="tiny", base_dir=root)
    with VisionCounter() as vision, CacheTimer() as built, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        rsrun.run_training(config, out, verify_images=False)
        wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [h["epoch_time_s"] for h in metrics["history"]]
    return {"wall_s": wall, "epoch_s": epochs, "outside_epochs_s": wall - sum(epochs),
            "cache_build_s": built.seconds, "vision_forward_images": vision.images, "cache": built.cache,
            "train_images": metrics["data"]["train_images"], "val_images": metrics["data"]["val_images"],
            "config": config}


def loader_rate(dataset, collate, workers: int, passes: int = 3) -> float:
    """Images/s of a shuffled DataLoader (batch ``BATCH``) after one warm-up pass (worker start-up)."""
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(passes):
        for _ in loader:
            pass
    rate = passes * len(dataset) / (time.perf_counter() - start)
    del loader
    return rate


def step_rate(model_dir: Path, batches: list[dict], cached: bool, steps: int) -> float:
    """Images/s one training step consumes: ``train_one_epoch`` on pre-collated batches (LoRA r=16)."""
    cpu = torch.device("cpu")
    model = prepare_model(load_model(str(model_dir), cpu), "lora", r=16, alpha=32)
    if cached:
        features.use_cached_features(model)
    optimizer = build_optimizer(model, 1e-4, 0.0)
    scheduler = build_scheduler(optimizer, "constant", 0, 10**9)
    train_one_epoch(model, batches[:1], optimizer, scheduler, cpu)  # warm-up
    order = [batches[i % len(batches)] for i in range(steps)]
    start = time.perf_counter()
    train_one_epoch(model, order, optimizer, scheduler, cpu)
    return sum(b["labels"].shape[0] for b in order) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=120, help="RSICap images (about 80 %% train)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating cache off/on runs for (a)")
    parser.add_argument("--cache-views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps for the step rate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_libraries()
    flops_per_image = _gpu_bench().flops_per_image
    views = f"data.cache_views={args.cache_views}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth = write_synthetic_datasets(root / "data", args.train_images, 2, image_size=224)
        model, processor = build_small()
        model_dir = root / "small-instructblip"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        config_small = model.config
        del model

        # a. alternating runs each way; each cached run builds its own cache
        print(f"a. epoch time, cache off / on, {args.rounds} rounds ...", flush=True)
        rounds = {"off": [], "on": []}
        for i in range(args.rounds):
            rounds["off"].append(train(root, synth, model_dir, f"a-off-{i}", False, root / f"features-a{i}", views))
            rounds["on"].append(train(root, synth, model_dir, f"a-on-{i}", True, root / f"features-a{i}", views))
        off, on = rounds["off"][0], rounds["on"][0]
        prepared = rsrun.prepare_data(off["config"], verify_images=False)
        prompt_tokens, caption_tokens = padded_tokens(prepared.train, processor)
        small = flops_per_image(config_small, round(prompt_tokens), round(caption_tokens))
        xl = flops_per_image(flan_t5_xl_config(), 16, 96)

        # b. the sweep, each way, with a fresh cache folder
        sweep = {}
        for cache in (False, True):
            label = "on" if cache else "off"
            print(f"b. sweep r in {SWEEP_RANKS}, cache {label} ...", flush=True)
            runs = [train(root, synth, model_dir, f"b-{label}-r{r}", cache, root / "features-b", views,
                          f"lora.r={r}", f"lora.alpha={2 * r}") for r in SWEEP_RANKS]
            sweep[label] = {"wall_s": sum(x["wall_s"] for x in runs),
                            "vision_forward_images": sum(x["vision_forward_images"] for x in runs),
                            "cache_build_s": sum(x["cache_build_s"] for x in runs),
                            "per_trial_vision_forward_images": [x["vision_forward_images"] for x in runs]}

        # c. loader rates against step rates
        print("c. loader and step rates ...", flush=True)
        cfg = off["config"].data
        image_set = CaptionDataset(prepared.train, train_transform(224, cfg.aug_prob))
        image_collate = CaptionCollator(processor, cfg.max_prompt_tokens, cfg.max_caption_tokens)
        feature_set = features.CachedFeatureDataset(prepared.train, on["cache"], True)
        feature_collate = features.CachedFeatureCollator(processor, cfg.max_prompt_tokens, cfg.max_caption_tokens)
        workers = (0, 1, 2)
        loader = {"off": {w: loader_rate(image_set, image_collate, w) for w in workers},
                  "on": {w: loader_rate(feature_set, feature_collate, w) for w in workers}}
        eval_set = CaptionDataset(prepared.train, eval_transform(224))
        chunks = [list(range(i, i + BATCH)) for i in range(0, len(prepared.train) - BATCH + 1, BATCH)][:4]
        image_batches = [image_collate([eval_set[i] for i in c]) for c in chunks]
        feature_batches = [feature_collate([feature_set[i] for i in c]) for c in chunks]
        steps = {"off": step_rate(model_dir, image_batches, False, args.steps),
                 "on": step_rate(model_dir, feature_batches, True, args.steps)}

    n_train, n_val = on["train_images"], on["val_images"]
    expected = n_train * args.cache_views + n_val
    median = {k: {key: statistics.median(r[key] if key != "epoch1_s" else r["epoch_s"][0] for r in runs)
                  for key in ("epoch1_s", "cache_build_s", "outside_epochs_s")} for k, runs in rounds.items()}
    epoch2 = {k: statistics.median(r["epoch_s"][1] for r in runs) for k, runs in rounds.items()}
    epoch_ratio = epoch2["off"] / epoch2["on"]
    round_ratios = [a["epoch_s"][1] / b["epoch_s"][1] for a, b in zip(rounds["off"], rounds["on"])]
    rest = small["step"] - small["vision_fwd"]
    xl_rest = xl["step"] - xl["vision_fwd"]
    # FLOPs of one epoch (train images: step; val images: forward only), to set the measured ratio against
    val_fwd = small["vision_fwd"] + small["qformer_fwd"] + small["t5_fwd"]
    epoch_flops_off = n_train * small["step"] + n_val * val_fwd
    epoch_flops_on = n_train * small["step_cached"] + n_val * (val_fwd - small["vision_fwd"])
    sweep_ratio = sweep["off"]["wall_s"] / sweep["on"]["wall_s"]

    g = 1e9
    print("\nFLOPs per training image (2 x weights x tokens per forward matmul + attention QK^T/AV; LoRA: the "
          "tower and Q-Former run forward only, T5 backward counted as 2x its forward):")
    print(f"{'':<30}{'vision fwd':>12}{'Q-Former fwd':>14}{'T5 fwd+bwd':>12}{'vision : rest':>15}")
    print(f"{'small model (this bench)':<30}{small['vision_fwd'] / g:>11.2f}G{small['qformer_fwd'] / g:>13.3f}G"
          f"{small['t5_fwd_bwd'] / g:>11.2f}G{'1 : ' + format(rest / small['vision_fwd'], '.2f'):>15}")
    print(f"{'flan-t5-xl (16 + 96 tokens)':<30}{xl['vision_fwd'] / g:>11.1f}G{xl['qformer_fwd'] / g:>13.2f}G"
          f"{xl['t5_fwd_bwd'] / g:>11.1f}G{'1 : ' + format(xl_rest / xl['vision_fwd'], '.2f'):>15}")
    print(f"  small model tokens: 257 vision, {NUM_QUERY_TOKENS} queries, prompt {prompt_tokens:.1f} and caption "
          f"{caption_tokens:.1f} (means as padded in batches of {BATCH}); {n_train} train + {n_val} val images; "
          f"FLOPs predict an epoch ratio of {epoch_flops_off / epoch_flops_on:.2f}x")

    rows = [
        ("a. epoch 2 (train + val), s", f"{epoch2['off']:.2f}", f"{epoch2['on']:.2f}", f"{epoch_ratio:.3f}x",
         ">= 1.4x"),
        ("a. epoch 1 (train + val), s", f"{median['off']['epoch1_s']:.2f}", f"{median['on']['epoch1_s']:.2f}",
         f"{median['off']['epoch1_s'] / median['on']['epoch1_s']:.2f}x", ""),
        ("a. cache build, s", "-", f"{median['on']['cache_build_s']:.2f}", "", f"({expected} views)"),
        ("a. run time outside epochs, s", f"{median['off']['outside_epochs_s']:.2f}",
         f"{median['on']['outside_epochs_s']:.2f}", "", ""),
        (f"b. sweep {len(SWEEP_RANKS)} trials x 2 epochs, s", f"{sweep['off']['wall_s']:.1f}",
         f"{sweep['on']['wall_s']:.1f}", f"{sweep_ratio:.2f}x", ""),
        ("b. vision forwards, images", str(sweep["off"]["vision_forward_images"]),
         str(sweep["on"]["vision_forward_images"]),
         f"{sweep['off']['vision_forward_images'] / max(sweep['on']['vision_forward_images'], 1):.2f}x",
         f"on = {n_train}x{args.cache_views}+{n_val} = {expected}"),
    ]
    for w in workers:
        rows.append((f"c. loader, {w} worker{'s' if w != 1 else ''}, images/s", f"{loader['off'][w]:.0f}",
                     f"{loader['on'][w]:.0f}", "", ""))
    rows.append(("c. training step consumes, images/s", f"{steps['off']:.1f}", f"{steps['on']:.1f}", "",
                 "loader >= step"))
    print(f"\n{'measurement':<40}{'cache off':>11}{'cache on':>11}{'off/on':>9}   goal")
    for name, a, b, ratio, goal in rows:
        print(f"{name:<40}{a:>11}{b:>11}{ratio:>9}   {goal}")

    met_epoch = epoch_ratio >= 1.4
    met_views = sweep["on"]["vision_forward_images"] == expected
    build = median["on"]["cache_build_s"]
    print(f"\na. cached epoch 2 is {epoch_ratio:.3f}x faster (ratio of the median epoch times over {args.rounds} "
          f"alternating rounds; per round {', '.join(f'{r:.2f}x' for r in round_ratios)}; "
          f"goal >= 1.4x: {'met' if met_epoch else 'NOT met'}; "
          f"FLOPs predict {epoch_flops_off / epoch_flops_on:.2f}x); the cache took {build:.1f} s to build, "
          f"about {build / max(epoch2['off'] - epoch2['on'], 1e-9):.1f} epochs' saving")
    print(f"b. with the cache the sweep ran the tower on {sweep['on']['vision_forward_images']} images (per trial: "
          f"{sweep['on']['per_trial_vision_forward_images']}), goal {expected} = one per image view: "
          f"{'met' if met_views else 'NOT met'}; without it {sweep['off']['vision_forward_images']}; "
          f"sweep time {sweep_ratio:.2f}x shorter")
    verdicts = {}
    for label, name in (("off", "image loader"), ("on", "cached-feature loader")):
        s = steps[label]
        parts = []
        for w in workers:
            rate = loader[label][w]
            if w == 0:
                verdicts[(label, w)] = None
                parts.append(f"in-line: adds {s / rate:.0%} to each step")
            else:
                verdicts[(label, w)] = rate >= s
                parts.append(f"{w} worker{'s' if w > 1 else ''}: {'keeps up' if rate >= s else 'does NOT keep up'}"
                             f" ({rate / s:.1f}x the step's need)")
        print(f"c. {name} vs cache-{label} step ({s:.1f} images/s): " + "; ".join(parts))

    if args.json:
        for run in rounds["off"] + rounds["on"]:
            run.pop("cache"), run.pop("config")
        args.json.write_text(json.dumps({
            "feature_cache": {
                "flops_per_image": {"small": small, "flan_t5_xl": xl,
                                    "small_vision_to_rest": rest / small["vision_fwd"],
                                    "flan_t5_xl_vision_to_rest": xl_rest / xl["vision_fwd"],
                                    "small_prompt_tokens": prompt_tokens, "small_caption_tokens": caption_tokens},
                "sizes": {"vision": VISION, "qformer": QFORMER, "text": TEXT, "num_query_tokens": NUM_QUERY_TOKENS},
                "train_images": n_train, "val_images": n_val, "cache_views": args.cache_views,
                "epoch": {"rounds": rounds, "epoch2_median_s": epoch2, "medians": median, "epoch2_ratio": epoch_ratio,
                          "epoch2_ratio_per_round": round_ratios,
                          "flops_epoch_ratio": epoch_flops_off / epoch_flops_on, "goal_met": met_epoch},
                "sweep": {**sweep, "ranks": list(SWEEP_RANKS), "wall_ratio": sweep_ratio,
                          "expected_cached_vision_forwards": expected, "goal_met": met_views},
                "loader_images_per_s": loader, "step_images_per_s": steps,
                "loader_keeps_up": {f"cache_{k[0]}_workers_{k[1]}": v for k, v in verdicts.items() if v is not None},
            }}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
