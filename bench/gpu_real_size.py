"""Real-size GPU benchmark: LoRA training steps of the flan-t5-xl InstructBLIP, capped at 24 GiB.

Builds ``Salesforce/instructblip-flan-t5-xl``'s architecture (``rsilora.model.flan_t5_xl_config``:
ViT-g 1408 x 39 layers, Q-Former 768 x 12, flan-t5-xl 2048 x 24+24) with random bf16 weights
directly on the GPU (nothing is downloaded), adds LoRA r=16 on the language model's q, k, v, o
(``rsilora.model.add_lora``) and caps this process at 24 GiB of GPU memory
(``torch.cuda.set_per_process_memory_fraction``) to show what fits an RTX 3090. Then, for batch
sizes 4, 8, 16 x gradient checkpointing off/on x feature cache off/on, it times training steps
(forward + backward + clipping + AdamW on the LoRA parameters, through ``rsilora.train.train_one_epoch``
with bf16 autocast, as a real run): 3 warm-up steps, then 5 timed steps between
``torch.cuda.synchronize()`` calls. Cache off feeds random 224 px images; cache on replaces the
tower by ``rsilora.features.FeatureLookup`` and feeds random ``(B, 257, 1408)`` bf16 features, as
a cached run does. Each step's text is what the processor builds: 32 ``<image>`` placeholders +
16 prompt tokens for the T5 encoder, 16 Q-Former tokens, 96 caption (label) tokens.

Reported per setting: step time, images/s, achieved TFLOP/s and MFU (model FLOPs per image from
:func:`flops_per_image` x images/s, against the card's peak dense bf16 rate), peak memory
(``torch.cuda.max_memory_allocated``), and the estimated epoch time on an RTX 3090 for RSICap's
2,068 training images at the measured MFU (``2068 x FLOPs per image / (71e12 x MFU)``: assumes
the 3090 reaches the same MFU, which small cards usually do not quite). A setting that does not
fit is reported as "OOM (does not fit 24 GiB)" and the run goes on. Without a CUDA device the
script says so and exits 0. About 1-2 minutes on an H100/H200.

    .venv/bin/python bench/gpu_real_size.py [--batch-sizes 4 8 16] [--memory-gib 24]
                                            [--peak-tflops N] [--json out.json]

FLOP convention (``flops_per_image``): a forward matmul costs 2 x weights x tokens; attention's
two activation-activation matmuls (QK^T, AV) are counted too; norms, softmax and activations are
not. With LoRA the vision tower and the Q-Former run forward only (frozen, and upstream of every
adapter); the T5 backward is counted as 2x its forward (the usual training convention; the
frozen weights themselves need no weight gradients, so the GPU executes about 1x for their
matmuls: the JSON also gives that lower count). Gradient checkpointing's recomputation is not
model FLOPs (MFU convention) and is not counted. ``--cpu-smoke`` runs every code path on a tiny
architecture on the CPU (figures meaningless) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import torch

NO_GPU = "no CUDA device: this benchmark needs a GPU (it measures the real flan-t5-xl architecture)"
RTX_3090_TFLOPS = 71.0
RSICAP_TRAIN_IMAGES = 2068
# Peak dense bf16 tensor-core TFLOP/s (no sparsity), matched as whole words against the device name
# ("A10" is not "A100" or "A10G"); an unknown card needs --peak-tflops for the MFU column.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("RTX 3090", 71.0),
                    ("RTX 4090", 165.0), ("A10", 125.0))


def flops_per_image(config, prompt_tokens: int, caption_tokens: int, lora: bool = True, *,
                    qformer_tokens: int | None = None, backward_factor: float = 2.0) -> dict:
    """Model FLOPs of one training image for an InstructBLIP (T5 language model) ``config``.

    ``prompt_tokens``: the instruction's T5 tokens (with ``</s>``); the T5 encoder reads them after
    the ``num_query_tokens`` image tokens. ``caption_tokens``: label tokens (decoder length).
    ``qformer_tokens``: the instruction's Q-Former tokens (default ``prompt_tokens``).
    ``lora=True``: only the language model gets a backward, ``backward_factor`` x its forward
    (default 2: activation + weight gradients, the usual count; 1 is what frozen weights strictly
    need). ``lora=False`` (full fine-tuning): every part gets a 2x backward.

    Returns FLOPs per image: ``vision_fwd``, ``qformer_fwd`` (with the language projection),
    ``t5_fwd``, ``t5_bwd``, ``t5_fwd_bwd``, ``vision_bwd``/``qformer_bwd`` (0 with LoRA),
    ``step`` (the whole training step, tower included), ``step_cached`` (without the tower:
    features come from the cache), ``t5_fwd_bwd_activation_grads_only`` (backward 1x forward),
    and the token counts used.
    """
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    n_query = config.num_query_tokens
    qformer_tokens = prompt_tokens if qformer_tokens is None else qformer_tokens

    # Vision tower (ViT): patch embedding, then pre-norm blocks over patches + CLS.
    patches = (v.image_size // v.patch_size) ** 2
    tv, d, f = patches + 1, v.hidden_size, v.intermediate_size
    vision = 2 * 3 * v.patch_size ** 2 * d * patches
    vision += v.num_hidden_layers * (2 * (4 * d * d + 2 * d * f) * tv + 4 * tv * tv * d)

    # Q-Former: queries + instruction tokens self-attend; queries cross-attend to the image tokens
    # every `cross_attention_frequency` layers; queries and text tokens each have their own FFN.
    h, hf, e = q.hidden_size, q.intermediate_size, q.encoder_hidden_size
    ts = n_query + qformer_tokens
    qformer = 0
    for layer in range(q.num_hidden_layers):
        qformer += 2 * (4 * h * h + 2 * h * hf) * ts + 4 * ts * ts * h
        if layer % q.cross_attention_frequency == 0:
            qformer += 2 * (2 * h * h) * n_query + 2 * (2 * e * h) * tv + 4 * n_query * tv * h
    qformer += 2 * h * t.d_model * n_query  # language projection

    # T5: encoder over image tokens + prompt, decoder over the caption, LM head on the caption.
    dm, inner = t.d_model, t.num_heads * t.d_kv
    ffn = (3 if t.is_gated_act else 2) * dm * t.d_ff
    te, td = n_query + prompt_tokens, caption_tokens
    encoder = t.num_layers * (2 * (4 * dm * inner + ffn) * te + 4 * te * te * inner)
    decoder = t.num_decoder_layers * (2 * (4 * dm * inner + 2 * dm * inner + ffn) * td  # self q,k,v,o; cross q,o
                                      + 2 * (2 * dm * inner) * te  # cross-attention k, v on the encoder output
                                      + 4 * td * td * inner + 4 * td * te * inner)
    lm_head = 2 * dm * t.vocab_size * td
    t5_fwd = encoder + decoder + lm_head

    t5_bwd = (backward_factor if lora else 2.0) * t5_fwd
    vision_bwd = 0 if lora else 2 * vision
    qformer_bwd = 0 if lora else 2 * qformer
    step = vision + vision_bwd + qformer + qformer_bwd + t5_fwd + t5_bwd
    return {
        "vision_fwd": vision, "qformer_fwd": qformer, "t5_fwd": t5_fwd, "t5_bwd": t5_bwd,
        "t5_fwd_bwd": t5_fwd + t5_bwd, "vision_bwd": vision_bwd, "qformer_bwd": qformer_bwd,
        "step": step, "step_cached": step - vision - vision_bwd,
        "t5_fwd_bwd_activation_grads_only": 2 * t5_fwd,
        "tokens": {"vision": tv, "qformer": ts, "t5_encoder": te, "t5_decoder": td},
        "backward_factor": backward_factor if lora else 2.0, "lora": lora,
    }


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of the card (``override`` wins; None when the name is unknown)."""
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name, re.IGNORECASE):
            return value
    return None


def synthetic_batch(config, batch_size: int, prompt_tokens: int, caption_tokens: int, cached: bool,
                    device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """A batch shaped as the collators build it (``CaptionCollator`` / ``CachedFeatureCollator``).

    T5 input: ``num_query_tokens`` x ``<image>`` (replaced by the Q-Former output), then the prompt
    ending in ``</s>``; Q-Former input: ``[CLS] prompt [SEP]``; labels: caption ending in ``</s>``.
    """
    t, q, v = config.text_config, config.qformer_config, config.vision_config
    b, n = batch_size, config.num_query_tokens

    def words(vocab: int, length: int) -> torch.Tensor:
        return torch.randint(3, min(vocab, 32000), (b, length), generator=generator)

    eos = torch.full((b, 1), t.eos_token_id)
    image = torch.full((b, n), config.image_token_index)
    input_ids = torch.cat([image, words(t.vocab_size, prompt_tokens - 1), eos], dim=1)
    labels = torch.cat([words(t.vocab_size, caption_tokens - 1), eos], dim=1)
    qformer_ids = torch.cat([torch.full((b, 1), 101), words(q.vocab_size, prompt_tokens - 2),
                             torch.full((b, 1), 102)], dim=1)
    if cached:
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        pixels = torch.randn((b, tokens, v.hidden_size), generator=generator)
    else:
        pixels = torch.randn((b, 3, v.image_size, v.image_size), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "qformer_input_ids": qformer_ids, "qformer_attention_mask": torch.ones_like(qformer_ids),
             "pixel_values": pixels.to(dtype), "labels": labels}
    return {k: x.to(device) for k, x in batch.items()}


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random-weight InstructBLIP built in ``dtype`` directly on ``device`` (no fp32 copy on the way)."""
    from transformers import InstructBlipForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InstructBlipForConditionalGeneration(config)
            # transformers 5 ties T5's lm_head to the input embedding; flan-t5 has its own (see
            # rsilora.model.build_meta_model): untie, so the parameter count and memory are the real ones.
            text = config.text_config
            model.language_model.lm_head = torch.nn.Linear(text.d_model, text.vocab_size, bias=False)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def set_checkpointing(model, enabled: bool) -> None:
    """Turn gradient checkpointing on (as ``rsilora.model.prepare_model`` does) or off."""
    if enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.activation_checkpointing_disable()
        if hasattr(model, "disable_input_require_grads"):
            try:
                model.disable_input_require_grads()
            except AttributeError:  # never enabled
                pass


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(model, config, device: torch.device, batch_size: int, cached: bool, args, optimizer, scheduler) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup``; returns step time and peak memory."""
    from rsilora.train import train_one_epoch

    generator = torch.Generator().manual_seed(batch_size)
    dtype = torch.bfloat16
    autocast = torch.bfloat16 if device.type == "cuda" else None
    batches = [synthetic_batch(config, batch_size, args.prompt_tokens, args.caption_tokens, cached, device, dtype,
                               generator) for _ in range(2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(steps: int) -> None:
        train_one_epoch(model, [batches[i % 2] for i in range(steps)], optimizer, scheduler, device,
                        grad_accum=1, max_grad_norm=1.0, autocast_dtype=autocast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(args.warmup)
    sync()
    start = time.perf_counter()
    run(args.steps)
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"step_s": step_s, "images_per_s": batch_size / step_s, "peak_mem_gib": peak}


def free_memory(optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def smoke_config():
    """A tiny InstructBLIP-T5 config with the real model's structure, for ``--cpu-smoke``."""
    from transformers import InstructBlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14, initializer_range=0.02)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=30523)
    text = dict(model_type="t5", vocab_size=32128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=32, image_token_index=32100)


def fmt_flops(n: float) -> str:
    return f"{n / 1e9:,.1f} GFLOP"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-gib", type=float, default=24.0, help="cap this process's GPU memory (RTX 3090)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the card (default: by name)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--caption-tokens", type=int, default=96)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every code path on a tiny architecture on the CPU (figures meaningless)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU)
        if args.json:
            args.json.write_text(json.dumps({"gpu_real_size": {"skipped": NO_GPU}}, indent=2))
        return 0

    from rsilora.features import use_cached_features
    from rsilora.model import add_lora, count_parameters, flan_t5_xl_config, quiet_libraries
    from rsilora.train import build_optimizer, build_scheduler

    quiet_libraries()
    torch.manual_seed(0)
    if args.cpu_smoke:
        device, config, name = torch.device("cpu"), smoke_config(), "CPU (smoke test, tiny architecture)"
        peak = args.peak_tflops or 1.0
        cap_gib = None
    else:
        device, config = torch.device("cuda"), flan_t5_xl_config()
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name, args.peak_tflops)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        total = torch.cuda.get_device_properties(device).total_memory
        cap_gib = min(args.memory_gib, total / 2**30)
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)

    flops = flops_per_image(config, args.prompt_tokens, args.caption_tokens, lora=True)
    print(f"device: {name}; peak dense bf16 {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s; "
          f"memory cap {f'{cap_gib:.0f} GiB' if cap_gib else 'none'}")
    print(f"FLOPs per training image ({args.prompt_tokens} prompt + {args.caption_tokens} caption tokens, "
          f"{config.num_query_tokens} query tokens, {flops['tokens']['vision']} vision tokens):")
    print(f"  vision tower forward  {fmt_flops(flops['vision_fwd']):>16}")
    print(f"  Q-Former forward      {fmt_flops(flops['qformer_fwd']):>16}  (with the language projection)")
    print(f"  T5 forward            {fmt_flops(flops['t5_fwd']):>16}")
    print(f"  T5 forward + backward {fmt_flops(flops['t5_fwd_bwd']):>16}  (backward = 2x forward; "
          f"{fmt_flops(flops['t5_fwd_bwd_activation_grads_only'])} counting activation gradients only)")
    print(f"  step, tower included  {fmt_flops(flops['step']):>16}  (vision share "
          f"{flops['vision_fwd'] / flops['step']:.0%}; vision : rest = 1 : "
          f"{(flops['step'] - flops['vision_fwd']) / flops['vision_fwd']:.2f})")
    print(f"  step, cached features {fmt_flops(flops['step_cached']):>16}")
    print("  convention: 2 x weights x tokens per forward matmul + attention QK^T/AV; LoRA: no backward "
          "through the tower and Q-Former; recomputation (checkpointing) not counted")

    model = build_model(config, device, torch.bfloat16)
    model = add_lora(model, args.lora_r, 2 * args.lora_r, 0.1, ["q", "k", "v", "o"])
    params = count_parameters(model)
    print(f"parameters: total {params.total:,}, trainable (LoRA r={args.lora_r} on q,k,v,o) {params.trainable:,}",
          flush=True)
    optimizer = build_optimizer(model, 1e-5, 0.0)
    scheduler = build_scheduler(optimizer, "constant", 0, 10**9)

    rows = []
    for cached in (False, True):
        if cached:
            use_cached_features(model)  # the tower leaves the GPU, as in a cached run
            free_memory(optimizer)
        for checkpointing in (False, True):
            set_checkpointing(model, checkpointing)
            failed = False
            for batch_size in args.batch_sizes:
                row = {"batch_size": batch_size, "checkpointing": checkpointing, "feature_cache": cached}
                if failed:  # a smaller batch of this setting did not fit: neither will this one
                    row.update(oom=True, note="not tried: a smaller batch did not fit")
                    rows.append(row)
                    print_row(row, header=len(rows) == 1, cap_gib=cap_gib)
                    continue
                try:
                    row.update(oom=False, **measure(model, config, device, batch_size, cached, args, optimizer,
                                                    scheduler))
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    if not is_oom(error):
                        raise
                    row.update(oom=True, note="OOM")
                    failed = True
                free_memory(optimizer)
                if not row["oom"]:
                    per_image = flops["step_cached" if cached else "step"]
                    row["tflops"] = per_image * row["images_per_s"] / 1e12
                    if peak:
                        row["mfu"] = row["tflops"] / peak
                        row["rtx3090_epoch_min"] = (RSICAP_TRAIN_IMAGES * per_image
                                                    / (RTX_3090_TFLOPS * 1e12 * row["mfu"]) / 60)
                rows.append(row)
                print_row(row, header=len(rows) == 1, cap_gib=cap_gib)

    print(f"MFU: model FLOPs per image ({fmt_flops(flops['step'])} with the tower, "
          f"{fmt_flops(flops['step_cached'])} cached) x images/s / peak {peak} TFLOP/s. 3090 epoch: "
          f"{RSICAP_TRAIN_IMAGES} images at {RTX_3090_TFLOPS:g} TFLOP/s x the MFU measured here "
          "(assumes a 3090 reaches the same MFU; validation not included).")
    if args.json:
        args.json.write_text(json.dumps({"gpu_real_size": {
            "device": name, "peak_tflops": peak, "memory_cap_gib": cap_gib, "smoke": args.cpu_smoke,
            "prompt_tokens": args.prompt_tokens, "caption_tokens": args.caption_tokens, "lora_r": args.lora_r,
            "flops_per_image": flops, "warmup_steps": args.warmup, "timed_steps": args.steps, "rows": rows,
        }}, indent=2))
    return 0


def print_row(row: dict, header: bool, cap_gib: float | None) -> None:
    if header:
        print(f"\n{'batch':>5}{'ckpt':>6}{'cache':>7}{'step s':>9}{'img/s':>8}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'peak GiB':>10}{'3090 epoch':>12}")
    on_off = {True: "on", False: "off"}
    flags = f"{row['batch_size']:>5}{on_off[row['checkpointing']]:>6}{on_off[row['feature_cache']]:>7}"
    if row["oom"]:
        limit = f"{cap_gib:.0f} GiB" if cap_gib else "memory"
        extra = " (not tried: a smaller batch did not fit)" if row.get("note", "").startswith("not tried") else ""
        print(f"{flags}   OOM (does not fit {limit}){extra}", flush=True)
        return
    mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
    epoch = f"{row['rtx3090_epoch_min']:.1f} min" if "rtx3090_epoch_min" in row else "-"
    print(f"{flags}{row['step_s']:>9.3f}{row['images_per_s']:>8.1f}{row['tflops']:>9.1f}{mfu:>7}"
          f"{row['peak_mem_gib']:>10.1f}{epoch:>12}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
