"""The frozen-vision feature cache: same loss as the tower, keys that never reuse stale features."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from rsilora import features
from rsilora.augment import eval_transform
from rsilora.data import CaptionCollator, CaptionDataset, load_rsicap, open_image
from rsilora.model import load_model, prepare_model
from rsilora.run import run_training

CPU = torch.device("cpu")


def _cache(root, model, processor, **overrides) -> features.FeatureCache:
    settings = dict(size=224, views=3, augment=True, aug_prob=0.8, seed=0) | overrides
    return features.cache_for(root, model.vision_model, "tiny", processor.image_processor, **settings)


def test_cached_loss_equals_the_towers_loss_on_the_same_view(synth, tiny_model_dir, tiny_processor, tmp_path):
    records = load_rsicap(synth.rsicap_dir).records[:4]
    model = prepare_model(load_model(str(tiny_model_dir), CPU), "lora", r=4, alpha=8).eval()
    with torch.no_grad():  # a non-trivial adapter, so the language model's path matters too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    base = model.get_base_model()
    cache = _cache(tmp_path, base, tiny_processor)
    for train in (True, False):
        assert features.build_cache(cache, records, base.vision_model, tiny_processor.image_processor, CPU,
                                    train=train, progress=False) == 4 * (3 if train else 1)
    collate, cached_collate = CaptionCollator(tiny_processor), features.CachedFeatureCollator(tiny_processor)
    prompt, view = "Describe this image in detail.", 2
    direct = [{"image": features.render_views(cache, r, train=True)[view], "prompt": prompt, "caption": r.caption}
              for r in records]
    stored = [{"features": load_file(cache.path(r, True))["views"][view],
               "prompt": prompt, "caption": r.caption} for r in records]
    with torch.no_grad():
        expected = model(**collate(direct)).loss
        features.use_cached_features(model)
        got = model(**cached_collate(stored)).loss
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # fp16 storage of the features


def test_cached_batches_have_the_same_text_inputs(synth, tiny_processor, tmp_path):
    records = load_rsicap(synth.rsicap_dir).records[:3]
    dataset = CaptionDataset(records, eval_transform(224))
    plain = CaptionCollator(tiny_processor, 64, 384)([dataset[i] for i in range(3)])
    items = [{"features": torch.zeros(50, 32, dtype=torch.float16), "prompt": r.prompt, "caption": r.caption}
             for r in records]
    cached = features.CachedFeatureCollator(tiny_processor, 64, 384)(items)
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "labels"):
        assert torch.equal(plain[key], cached[key]), key
    assert cached["pixel_values"].shape == (3, 50, 32)


def test_keys_change_with_weights_settings_and_image_bytes(synth, tiny_model_dir, tiny_processor, tmp_path):
    model = load_model(str(tiny_model_dir), CPU)
    cache = _cache(tmp_path, model, tiny_processor)
    assert _cache(tmp_path, model, tiny_processor).folder == cache.folder
    assert _cache(tmp_path, model, tiny_processor, aug_prob=0.5).folder != cache.folder
    assert _cache(tmp_path, model, tiny_processor, views=4).folder != cache.folder
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.mul_(1.01)  # any change to the tower's weights
    assert _cache(tmp_path, model, tiny_processor).folder.parent != cache.folder.parent
    record = load_rsicap(synth.rsicap_dir).records[0]
    copy = tmp_path / "copy.png"
    copy.write_bytes(record.image_path.read_bytes())
    moved = type(record)(record.filename, copy, record.caption, record.prompt, record.where)
    assert cache.path(moved, True) == cache.path(record, True)  # keyed by content, not by path
    copy.write_bytes(record.image_path.read_bytes() + b"\0")
    assert cache.path(moved, True) != cache.path(record, True)
    assert cache.path(record, True) != cache.path(record, False)  # train views never serve as the eval view


def test_build_resumes_and_recomputes_broken_files(synth, tiny_model_dir, tiny_processor, tmp_path):
    model = load_model(str(tiny_model_dir), CPU)
    records = load_rsicap(synth.rsicap_dir).records[:5]
    cache = _cache(tmp_path, model, tiny_processor)
    build = lambda: features.build_cache(cache, records, model.vision_model,  # noqa: E731
                                         tiny_processor.image_processor, CPU, train=True, progress=False)
    assert build() == 15 and build() == 0
    cache.path(records[1], True).write_bytes(b"truncated")
    cache.path(records[3], True).unlink()
    assert build() == 6
    first = load_file(cache.path(records[0], True))["views"]
    assert first.dtype == torch.float16 and first.shape == (3, 50, 32)
    assert not torch.equal(first[0], first[1])  # distinct augmented views


def test_views_are_the_same_on_every_run(synth, tiny_model_dir, tiny_processor, tmp_path):
    model = load_model(str(tiny_model_dir), CPU)
    record = load_rsicap(synth.rsicap_dir).records[0]
    cache = _cache(tmp_path, model, tiny_processor)
    torch.manual_seed(123)
    a = features.render_views(cache, record, train=True)
    torch.manual_seed(456)
    b = features.render_views(cache, record, train=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert features.render_views(cache, record, train=False)[0].equal(eval_transform(224)(open_image(record)))


def test_training_uses_the_cache_and_full_fine_tuning_does_not(make_config, capsys):
    run_training(make_config("train.epochs=1"))
    out = capsys.readouterr().out
    assert "feature cache:" in out
    run_training(make_config("train.epochs=1", "model.mode=full", "train.lr=1e-4"), overwrite=True)
    assert "feature cache off: model.mode=full" in capsys.readouterr().out
