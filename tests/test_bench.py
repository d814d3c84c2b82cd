"""The real-size GPU benchmark: its no-GPU exit, its FLOP count, and its code paths on a tiny CPU model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsilora.model import flan_t5_xl_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_real_size.py"
VISION_PARAMS = 985_952_256  # ViT-g of instructblip-flan-t5-xl


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_cleanly_without_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: this benchmark needs a GPU" in result.stdout
    assert "skipped" in json.loads(out.read_text())["gpu_real_size"]


def test_flops_per_image_for_flan_t5_xl():
    flops = _load_bench().flops_per_image(flan_t5_xl_config(), prompt_tokens=16, caption_tokens=96)
    assert flops["vision_fwd"] == pytest.approx(2 * VISION_PARAMS * 257, rel=0.05)
    ratio = flops["t5_fwd_bwd"] / flops["vision_fwd"]  # vision : (T5 forward + backward) = 1 : ratio
    assert 1.5 <= ratio <= 4.0
    assert flops["t5_fwd_bwd"] == pytest.approx(3 * flops["t5_fwd"])  # LoRA convention: backward = 2x forward
    assert flops["vision_bwd"] == flops["qformer_bwd"] == 0
    assert flops["step"] == pytest.approx(flops["vision_fwd"] + flops["qformer_fwd"] + flops["t5_fwd_bwd"])
    assert flops["step_cached"] == pytest.approx(flops["step"] - flops["vision_fwd"])
    full = _load_bench().flops_per_image(flan_t5_xl_config(), 16, 96, lora=False)
    assert full["step"] == pytest.approx(3 * (full["vision_fwd"] + full["qformer_fwd"] + full["t5_fwd"]))


def test_peak_rate_by_device_name():
    peak = _load_bench().peak_tflops
    assert peak("NVIDIA H100 80GB HBM3", None) == 989 and peak("NVIDIA A100-SXM4-80GB", None) == 312
    assert peak("NVIDIA A10", None) == 125 and peak("NVIDIA A10G", None) is None  # whole words only
    assert peak("NVIDIA GeForce RTX 3090", None) == 71 and peak("Tesla T4", 65.0) == 65.0


def test_every_code_path_runs_on_a_tiny_cpu_model_and_oom_is_reported(monkeypatch, tmp_path, capsys):
    bench = _load_bench()
    real_measure = bench.measure

    def measure(model, config, device, batch_size, cached, *args):
        if batch_size > 2 and not cached:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_measure(model, config, device, batch_size, cached, *args)

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "smoke.json"
    monkeypatch.setattr(sys, "argv", ["gpu_real_size.py", "--cpu-smoke", "--batch-sizes", "2", "4", "8",
                                      "--warmup", "1", "--steps", "1", "--json", str(out)])
    assert bench.main() == 0
    printed = capsys.readouterr().out
    assert "OOM (does not fit memory)" in printed
    rows = json.loads(out.read_text())["gpu_real_size"]["rows"]
    assert len(rows) == 12
    oom = [(r["batch_size"], r["feature_cache"]) for r in rows if r["oom"]]
    assert sorted(oom) == [(4, False), (4, False), (8, False), (8, False)]
    assert [r for r in rows if r["oom"] and r["batch_size"] == 8][0]["note"].startswith("not tried")
    ok = [r for r in rows if not r["oom"]]
    assert all(r["step_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"] for r in ok)


def test_asha_replay_follows_rays_scheduler_and_depends_on_the_order():
    spec = importlib.util.spec_from_file_location("asha_vs_fifo", REPO / "bench" / "asha_vs_fifo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # nine trials with flat curves, trial i at loss 1 + i, one epoch = 1 s, one trial at a time
    curves = [[(1.0 + i, 1.0)] * 9 for i in range(9)]
    # best first: it runs all 9 epochs; each later (worse) trial is cut at the first rung (epoch 1)
    assert bench.replay_asha(curves, 1, max_t=9, grace=1, reduction_factor=3) == (9 + 8, 1.0)
    # worst first: every trial beats the rung's cutoff of those before it, so none is ever stopped
    assert bench.replay_asha(curves[::-1], 1, max_t=9, grace=1, reduction_factor=3) == (81, 1.0)
