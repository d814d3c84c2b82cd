"""Loaders on real and synthetic files, the split, leakage, every bad-input case, batching."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from rsilora import data as rsdata
from rsilora.augment import eval_transform

from conftest import placeholder_images, write_dataset

PROMPT = "Describe this image in detail."


def _record(i: int, name: str | None = None, caption: str = "A road runs north to south.") -> dict:
    return {"image_id": str(i), "filename": name or f"P{i:04d}_0000.png", "text_input": PROMPT,
            "text_output": caption}


@pytest.fixture(scope="module")
def real_dirs(rsgpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rsicap = placeholder_images(rsgpt / "RSICap" / "captions.json", root / "RSICap")
    rsieval = placeholder_images(rsgpt / "RSIEval" / "annotations.json", root / "RSIEval")
    return rsicap, rsieval


# --- the real release ---------------------------------------------------------------------

def test_real_rsicap_and_rsieval_load(real_dirs):
    rsicap = rsdata.load_rsicap(real_dirs[0])
    rsieval = rsdata.load_rsieval(real_dirs[1])
    assert len(rsicap.records) == 2585 and not rsicap.skipped
    assert len({r.prompt for r in rsicap.records}) == 4
    assert len(rsieval.records) == 100
    assert sum(len(r.qa_pairs) for r in rsieval.records) == 943
    assert all(r.prompt is None and r.caption.strip() for r in rsieval.records)
    assert len({rsdata.scene_of(r.filename) for r in rsicap.records}) == 1015


def test_real_split_sizes_and_no_scene_on_both_sides(real_dirs):
    names = rsdata.load_rsicap(real_dirs[0], verify_images=False).filenames
    by_image = rsdata.make_split(names, 0.2, seed=0, by="image")
    assert (len(by_image.train), len(by_image.val)) == (2068, 517)
    by_scene = rsdata.make_split(names, 0.2, seed=0, by="scene")
    assert len(by_scene.train) + len(by_scene.val) == 2585
    assert 0.19 <= len(by_scene.val) / 2585 <= 0.21
    train_scenes = {rsdata.scene_of(n) for n in by_scene.train}
    assert not train_scenes & {rsdata.scene_of(n) for n in by_scene.val}
    # the per-image split leaks scenes across the boundary: the reason scene is the default
    assert {rsdata.scene_of(n) for n in by_image.train} & {rsdata.scene_of(n) for n in by_image.val}


def test_real_rsieval_does_not_leak(real_dirs):
    names = rsdata.load_rsicap(real_dirs[0], verify_images=False).filenames
    split = rsdata.make_split(names, 0.2, seed=0)
    test = rsdata.load_rsieval(real_dirs[1], verify_images=False).filenames
    assert rsdata.leakage_problems(split, test, "RSIEval") == []


# --- split --------------------------------------------------------------------------------

def test_split_is_deterministic_order_independent_and_seeded():
    names = [f"P{s:04d}_{c:04d}.png" for s in range(60) for c in range(s % 4 + 1)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    a = rsdata.make_split(names, 0.2, seed=3)
    assert a == rsdata.make_split(shuffled, 0.2, seed=3)
    assert a.val != rsdata.make_split(names, 0.2, seed=4).val
    assert set(a.train).isdisjoint(a.val) and set(a.train) | set(a.val) == set(names)


def test_names_without_a_scene_split_per_image():
    names = [f"img_{i}.jpg" for i in range(50)]
    split = rsdata.make_split(names, 0.2, seed=0, by="scene")
    assert (len(split.train), len(split.val)) == (40, 10)


def test_split_is_written_once_and_reused(tmp_path):
    names = [f"P{s:04d}_0000.png" for s in range(20)]
    split, folder, created = rsdata.load_or_create_split(names, tmp_path, 0.2, 0, "scene")
    assert created and (folder / "train.txt").is_file() and (folder / "val.txt").is_file()
    assert json.loads((folder / "split.json").read_text())["val_images"] == 4
    again, _, created_again = rsdata.load_or_create_split(names, tmp_path, 0.2, 0, "scene")
    assert not created_again and again == split
    with pytest.raises(rsdata.DataError, match="does not match the data"):
        rsdata.load_or_create_split(names + ["P9999_0000.png"], tmp_path, 0.2, 0, "scene")


def test_leakage_by_image_and_by_scene():
    split = rsdata.make_split(["P0001_0001.png", "P0002_0001.png", "P0003_0001.png"], 0.34, 0)
    problems = rsdata.leakage_problems(split, ["P0001_0001.png", "P0002_0099.png", "P0777_0001.png"], "T")
    assert [p.message.split()[0:3] for p in problems] == [["test", "image", "is"], ["test", "image's", "scene"]]


# --- synthetic data -------------------------------------------------------------------------

def test_synthetic_data_loads_with_the_real_loaders(synth):
    rsicap = rsdata.load_rsicap(synth.rsicap_dir)
    rsieval = rsdata.load_rsieval(synth.rsieval_dir)
    assert len(rsicap.records) == synth.train_images and len(rsieval.records) == synth.test_images
    split = rsdata.make_split(rsicap.filenames, 0.2, 0)
    assert rsdata.leakage_problems(split, rsieval.filenames, synth.rsieval_dir) == []


# --- bad input: each case names the file and the record -------------------------------------

def _expect_problem(folder, needle, kind="rsicap"):
    loader = rsdata.load_rsicap if kind == "rsicap" else rsdata.load_rsieval
    with pytest.raises(rsdata.DataError) as info:
        loader(folder)
    text = str(info.value)
    assert needle in text, text
    return info.value.problems


def test_missing_image(tmp_path):
    folder = write_dataset(tmp_path, [_record(0), _record(1)], images=["P0000_0000.png"])
    (problem,) = _expect_problem(folder, "does not exist")
    assert "record #1" in problem.where and "captions.json" in problem.where


def test_corrupt_and_truncated_images(tmp_path):
    folder = write_dataset(tmp_path, [_record(0), _record(1), _record(2)])
    (folder / "images" / "P0000_0000.png").write_bytes(b"not a png at all")
    good = (folder / "images" / "P0002_0000.png").read_bytes()
    (folder / "images" / "P0001_0000.png").write_bytes(good[: len(good) // 2])
    problems = _expect_problem(folder, "corrupt or unreadable image")
    assert [p.where.split("#")[1][0] for p in problems] == ["0", "1"]


def test_malformed_json_names_file_line_and_column(tmp_path):
    write_dataset(tmp_path, [_record(0)])
    (tmp_path / "captions.json").write_text('{"annotations": [\n  {"filename": "a.png",}\n]}')
    _expect_problem(tmp_path, "captions.json:2:")


def test_missing_field_wrong_type_and_not_an_object(tmp_path):
    bad = _record(1)
    del bad["text_output"]
    wrong = _record(2)
    wrong["text_input"] = 7
    folder = write_dataset(tmp_path, [_record(0), bad, wrong, "oops"])
    problems = _expect_problem(folder, "missing field 'text_output'")
    text = "\n".join(map(str, problems))
    assert "field 'text_input' must be str" in text and "record must be an object" in text
    assert len(problems) == 3


def test_empty_caption(tmp_path):
    folder = write_dataset(tmp_path, [_record(0, caption="   ")])
    _expect_problem(folder, "empty caption")


def test_rsieval_missing_caption_and_bad_qa(tmp_path):
    records = [{"filename": "P0001_0001.png", "qa_pairs": []},
               {"filename": "P0002_0001.png", "caption": "Two roads.", "qa_pairs": [{"question": "Q?"}]}]
    problems = _expect_problem(write_dataset(tmp_path, records, kind="rsieval"), "missing field 'caption'", "rsieval")
    assert any("qa_pairs[0]" in str(p) for p in problems)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_filenames_that_escape_the_images_folder(tmp_path, name):
    (tmp_path / "outside.png").write_bytes(b"x")
    folder = write_dataset(tmp_path / "set", [_record(0, name=name)], images=[])
    _expect_problem(folder, "escapes the images folder")


def test_symlink_out_of_the_images_folder(tmp_path):
    folder = write_dataset(tmp_path / "set", [_record(0)], images=[])
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    os.symlink(secret, folder / "images" / "P0000_0000.png")
    _expect_problem(folder, "link that leaves the images folder")


def test_duplicate_filenames(tmp_path):
    folder = write_dataset(tmp_path, [_record(0), _record(1, name="P0000_0000.png")])
    _expect_problem(folder, "duplicate filename 'P0000_0000.png' (also record #0)")


def test_skip_bad_keeps_good_records_and_counts_the_rest(tmp_path):
    folder = write_dataset(tmp_path, [_record(0), _record(1, caption=""), _record(2)], images=["P0000_0000.png",
                                                                                                "P0001_0000.png"])
    loaded = rsdata.load_rsicap(folder, skip_bad=True)
    assert loaded.filenames == ["P0000_0000.png"]
    assert len(loaded.skipped) == 2  # the empty caption and the missing image


def test_missing_json_or_images_folder(tmp_path):
    with pytest.raises(rsdata.DataError, match="captions.json: file does not exist"):
        rsdata.load_rsicap(tmp_path)
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": [_record(0)]}))
    with pytest.raises(rsdata.DataError, match="images folder does not exist"):
        rsdata.load_rsicap(tmp_path)


# --- batching -------------------------------------------------------------------------------

def test_collator_uses_the_processor_and_pads_labels(synth, tiny_processor):
    records = rsdata.load_rsicap(synth.rsicap_dir).records[:3]
    dataset = rsdata.CaptionDataset(records, eval_transform(224))
    batch = rsdata.CaptionCollator(tiny_processor, 64, 384)([dataset[i] for i in range(3)])
    n_query = tiny_processor.num_query_tokens
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    assert set(batch) >= {"input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "labels"}
    assert (batch["input_ids"][:, :n_query] == image_id).all()  # placeholders come first
    assert ((batch["input_ids"] == image_id).sum(1) == n_query).all()
    labels = batch["labels"]
    lengths = [len(tiny_processor.tokenizer(r.caption).input_ids) for r in records]
    assert labels.shape[1] == max(lengths)
    for row, n in zip(labels, lengths):
        assert (row[:n] != -100).all() and (row[n:] == -100).all()
        assert row[n - 1] == tiny_processor.tokenizer.eos_token_id
    # the instruction reaches the Q-Former too
    assert batch["qformer_attention_mask"].sum() > 3 * 2


def test_truncation_is_counted_and_applied(synth, tiny_processor):
    records = rsdata.load_rsicap(synth.rsicap_dir).records
    lengths = rsdata.caption_lengths([r.caption for r in records], tiny_processor.tokenizer, max_tokens=20)
    assert lengths.truncated == sum(len(tiny_processor.tokenizer(r.caption).input_ids) > 20 for r in records)
    assert lengths.truncated > 0 and "truncated at 20 tokens" in lengths.summary()
    dataset = rsdata.CaptionDataset(records[:2], eval_transform(224))
    batch = rsdata.CaptionCollator(tiny_processor, 64, 20)([dataset[0], dataset[1]])
    assert batch["labels"].shape[1] == 20


def test_dataset_requires_a_prompt_for_rsieval(synth):
    records = rsdata.load_rsieval(synth.rsieval_dir).records
    with pytest.raises(ValueError, match="no instruction"):
        rsdata.CaptionDataset(records, eval_transform(224))
    item = rsdata.CaptionDataset(records, eval_transform(224), prompt=PROMPT)[0]
    assert item["prompt"] == PROMPT and item["image"].dtype == torch.uint8
