"""Synthetic RSICap/RSIEval data: layout, determinism, and captions that are true of the pixels."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from rsilora import synth as sy
from rsilora.files import OutputExistsError

TRAIN, TEST, SIZE, SEED = 24, 6, 128, 3
# The test's own reading of the caption phrases (north is up), independent of the module's tables.
REGIONS = {"upper left": (0, 0), "at the top": (0, 1), "upper right": (0, 2), "left side": (1, 0),
           "in the center": (1, 1), "right side": (1, 2), "lower left": (2, 0), "at the bottom": (2, 1),
           "lower right": (2, 2)}
ALL = slice(None)
BANDS = {"north to south along the left side": (ALL, 0), "north to south through the center": (ALL, 1),
         "north to south along the right side": (ALL, 2), "east to west along the top": (0, ALL),
         "east to west through the center": (1, ALL), "east to west along the bottom": (2, ALL)}
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
QA_TYPES = {"presence", "quantity", "color", "ab_position", "re_position", "road_ori", "scene", "image",
            "area_comp", "reasoning"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = sy.write_synthetic_datasets(out, TRAIN, TEST, seed=SEED, image_size=SIZE)
    cap = json.loads((summary.rsicap_dir / "captions.json").read_text(encoding="utf-8"))["annotations"]
    ev = json.loads((summary.rsieval_dir / "annotations.json").read_text(encoding="utf-8"))["annotations"]
    return summary, cap, ev


def _scene_id(filename: str) -> int:
    return int(filename[1:5])


def _scenes(n: int, seed: int = 11) -> list[sy._Scene]:
    rng = np.random.default_rng(seed)
    return [sy._sample_scene(rng) for _ in range(n)]


def _cell_pixels(cell: tuple, size: int) -> tuple[slice, slice]:
    """Pixel rows/columns of a grid cell; a ``slice(None)`` row or column means the whole band."""
    def span(i):
        return slice(None) if isinstance(i, slice) else slice(i * size // 3, (i + 1) * size // 3)
    return span(cell[0]), span(cell[1])


def _named_cell(sentence: str) -> tuple[int, int]:
    found = [cell for phrase, cell in REGIONS.items() if phrase in sentence]
    assert len(found) == 1, sentence
    return found[0]


def test_layout_and_schema(made):
    summary, cap, ev = made
    assert (summary.train_images, summary.test_images) == (TRAIN, TEST)
    assert len(cap) == TRAIN and len(ev) == TEST
    assert [r["image_id"] for r in cap] == [str(i) for i in range(TRAIN)]
    assert all(set(r) == {"image_id", "filename", "text_input", "text_output"} for r in cap)
    assert all(set(r) == {"filename", "caption", "qa_pairs"} for r in ev)
    assert [r["text_input"] for r in cap[:4]] == list(sy.RSICAP_PROMPTS) and len(sy.RSICAP_PROMPTS) == 4
    assert {r["text_input"] for r in cap} == set(sy.RSICAP_PROMPTS)
    for folder, records in ((summary.rsicap_dir, cap), (summary.rsieval_dir, ev)):
        names = [r["filename"] for r in records]
        assert len(set(names)) == len(names)
        assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(names)  # no extra or temp files
        for name in names:
            assert name.startswith("P") and name.endswith(".png") and name[5] == "_"
            with Image.open(folder / "images" / name) as img:
                assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    raw = (summary.rsicap_dir / "captions.json").read_text(encoding="utf-8")
    assert raw.startswith('{\n  "annotations": [')  # indent 2


def test_scene_ids_are_grouped_and_never_shared(made):
    summary, cap, ev = made
    train_ids = [_scene_id(r["filename"]) for r in cap]
    test_ids = [_scene_id(r["filename"]) for r in ev]
    assert not set(train_ids) & set(test_ids)
    assert min(test_ids) > max(train_ids)
    assert any(train_ids.count(i) > 1 for i in set(train_ids))  # several crops of one scene
    assert max(train_ids.count(i) for i in set(train_ids)) <= 4
    assert (summary.train_scenes, summary.test_scenes) == (len(set(train_ids)), len(set(test_ids)))
    # crops of one scene share its theme: the opening sentence names the same kind of area
    themes: dict[int, set[str]] = {}
    for r in cap:
        opening = r["text_output"].split(".")[0]
        themes.setdefault(_scene_id(r["filename"]), set()).update(t for t in sy._THEMES if t in opening)
    assert all(len(t) == 1 for t in themes.values())


def test_same_seed_same_bytes_other_seed_other_text(made, tmp_path):
    summary, cap, _ = made
    again = sy.write_synthetic_datasets(tmp_path / "again", TRAIN, TEST, seed=SEED, image_size=SIZE)
    for name in ("RSICap/captions.json", "RSIEval/annotations.json"):
        assert (again.rsicap_dir.parent / name).read_bytes() == (summary.rsicap_dir.parent / name).read_bytes()
    for folder, other in ((summary.rsicap_dir, again.rsicap_dir), (summary.rsieval_dir, again.rsieval_dir)):
        for path in (folder / "images").iterdir():
            with Image.open(path) as a, Image.open(other / "images" / path.name) as b:
                assert np.array_equal(np.asarray(a), np.asarray(b))
    different = sy.write_synthetic_datasets(tmp_path / "other", TRAIN, TEST, seed=SEED + 1, image_size=SIZE)
    other_cap = json.loads((different.rsicap_dir / "captions.json").read_text(encoding="utf-8"))["annotations"]
    assert [r["text_output"] for r in other_cap] != [r["text_output"] for r in cap]


def test_caption_lengths_and_qa_pairs(made):
    _, cap, ev = made
    for text in [r["text_output"] for r in cap] + [r["caption"] for r in ev]:
        assert 30 <= len(text.split()) <= 110, text
    for r in ev:
        assert 5 <= len(r["qa_pairs"]) <= 10
        for qa in r["qa_pairs"]:
            assert set(qa) == {"question", "answer", "type"} and qa["type"] in QA_TYPES
            assert qa["question"].endswith("?") and qa["answer"].endswith(".")
        assert len({qa["question"] for qa in r["qa_pairs"]}) == len(r["qa_pairs"])
    assert len({qa["type"] for r in ev for qa in r["qa_pairs"]}) >= 6
    lengths = [len(text.split()) for text in sy.caption_corpus(400, seed=5)[:400]]
    assert all(30 <= n <= 110 for n in lengths) and 45 <= np.median(lengths) <= 80


def test_qa_answers_follow_the_scene():
    for scene in _scenes(60):
        roads = [line for line in scene.lines if line.kind == "road"]
        rivers = [line for line in scene.lines if line.kind == "river"]
        candidates = sy._qa_candidates(scene)
        answers = {q: a for _, q, a in candidates}
        assert len(answers) == len(candidates)  # no question asked twice, e.g. of two look-alike objects
        assert answers["Is there a river in the image?"] == ("Yes." if rivers else "No.")
        assert answers["Is there a road in the image?"] == ("Yes." if roads else "No.")
        if len(roads) == 1:
            assert answers["What is the orientation of the road?"] == roads[0].orient.capitalize() + "."
        for g in scene.groups:
            if g.kind == "buildings":
                where = sy._WHERE[g.cell]
                assert answers[f"What color are the roofs of the buildings {where}?"] == g.color.capitalize() + "."
                assert answers[f"How many buildings are {where}?"] == sy._num(g.count).capitalize() + "."


def test_objects_stay_in_the_cell_the_caption_names():
    """Removing one object group from a scene changes pixels only inside the grid cell the caption names."""
    rng_key = (99, 0, 0, 0)
    checked = 0
    for scene in _scenes(25):
        full = np.asarray(sy._render(scene, SIZE, sy._rng(*rng_key)), dtype=int)
        for k, g in enumerate(scene.groups):
            sentence = sy._group_sentence(g, np.random.default_rng(k)).lower()
            without = replace(scene, groups=scene.groups[:k] + scene.groups[k + 1:])
            rest = np.asarray(sy._render(without, SIZE, sy._rng(*rng_key)), dtype=int)
            changed = np.abs(full - rest).sum(-1) > 0
            inside = np.zeros_like(changed)
            inside[_cell_pixels(_named_cell(sentence), SIZE)] = True
            assert changed.any() and not (changed & ~inside).any(), (g.kind, g.cell)
            assert changed[inside].mean() > 0.02  # the group is visibly drawn, not a speck
            checked += 1
    assert checked > 40


def _blobs(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean mask."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count, queue = count + 1, deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_parking_lot_car_count_matches_the_drawn_cars():
    lots = [(s, g) for s in _scenes(80) for g in s.groups if g.kind == "parking"][:8]
    assert len(lots) >= 4
    for scene, lot in lots:
        empty = replace(scene, groups=tuple(replace(g, cars=()) if g is lot else g for g in scene.groups))
        a = np.asarray(sy._render(scene, 256, sy._rng(1, 2)), dtype=int)
        b = np.asarray(sy._render(empty, 256, sy._rng(1, 2)), dtype=int)
        cars = _blobs(np.abs(a - b).sum(-1) > 0)  # separate blobs: cars never touch each other
        said = f"parking lot with {WORDS[cars]} cars"
        assert said in sy._group_sentence(lot, np.random.default_rng(0))
        assert said in sy._caption(scene, np.random.default_rng(0))


def _bluish(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (b > r + 40) & (b > g + 20)


def test_water_is_drawn_where_the_caption_says():
    scenes = [s for s in _scenes(120) if any(line.kind == "river" for line in s.lines)][:10]
    assert len(scenes) >= 5
    for scene in scenes:
        caption = sy._caption(scene, np.random.default_rng(0))
        blue = _bluish(np.asarray(sy._render(scene, SIZE, np.random.default_rng(4))))
        river = next(s for s in caption.split(". ") if "river flows" in s or "river runs" in s)
        band = [b for phrase, b in BANDS.items() if phrase in river]
        assert len(band) == 1, river
        assert blue[_cell_pixels(band[0], SIZE)].mean() > 0.15
        wet = {g.cell for g in scene.groups if g.kind == "pond" or g.color == "blue"}
        dry = [(r, c) for r in range(3) for c in range(3)
               if (r, c) not in wet and band[0][0] != r and band[0][1] != c]
        assert len(dry) >= 2
        for cell in dry:
            assert blue[_cell_pixels(cell, SIZE)].mean() < 0.03, cell


def test_refuses_to_overwrite(tmp_path):
    first = sy.write_synthetic_datasets(tmp_path, 2, 1, image_size=64)
    before = (first.rsicap_dir / "captions.json").read_bytes()
    with pytest.raises(OutputExistsError):
        sy.write_synthetic_datasets(tmp_path, 3, 1, seed=1, image_size=64)
    assert (first.rsicap_dir / "captions.json").read_bytes() == before
    # an RSIEval leftover alone is enough to refuse, and RSICap is left as it was
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "RSIEval").mkdir()
    (tmp_path / "lone" / "RSIEval" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        sy.write_synthetic_datasets(tmp_path / "lone", 2, 1, image_size=64)
    assert (tmp_path / "lone" / "RSIEval" / "keep.txt").exists()
    again = sy.write_synthetic_datasets(tmp_path, 3, 0, seed=1, image_size=64, overwrite=True)
    assert len(list((again.rsicap_dir / "images").iterdir())) == 3
    assert json.loads((again.rsieval_dir / "annotations.json").read_text())["annotations"] == []


@pytest.mark.parametrize("kwargs", [dict(train_images=0), dict(test_images=-1), dict(image_size=32),
                                    dict(seed=-1), dict(train_images=2.5)])
def test_bad_arguments(tmp_path, kwargs):
    args = dict(train_images=2, test_images=1, image_size=64) | kwargs
    with pytest.raises(ValueError):
        sy.write_synthetic_datasets(tmp_path, **args)
    assert not any(tmp_path.iterdir())  # nothing written


def test_caption_corpus(made):
    _, cap, _ = made
    corpus = sy.caption_corpus(TRAIN, seed=SEED)
    assert len(corpus) > TRAIN and all(isinstance(t, str) and t for t in corpus)
    assert corpus == sy.caption_corpus(TRAIN, seed=SEED)
    assert corpus[:TRAIN] == [r["text_output"] for r in cap]  # same generators as the dataset
    assert any(t.endswith("?") for t in corpus) and sy.caption_corpus(TRAIN, seed=SEED + 1) != corpus
    with pytest.raises(ValueError):
        sy.caption_corpus(-1)
