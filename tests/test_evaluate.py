"""Caption metrics: equal to pycocoevalcap called directly; bootstrap aggregation equal to it too."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from rsilora import evaluate as ev

N_IMAGES, RESAMPLES = 30, 200
SCENES = ["residential area", "airport", "harbor", "parking lot", "industrial area", "farmland"]
OBJECTS = ["buildings", "planes", "ships", "cars", "storage tanks", "trees", "boats", "tennis courts"]
COLORS = ["white", "red", "grey", "blue", "green"]
NUMBERS = "two three four five six seven eight nine ten".split()
WHERE = ["in the upper left corner", "at the top", "on the right side", "in the center",
         "at the bottom", "on the left side", "in the lower right corner"]
LINES = ["a road runs from north to south", "a river crosses the image from east to west",
         "a railway runs along the bottom", "no roads are visible"]
FILLER = "the a of large small several near some image area".split()


def reference(i: int) -> str:
    """A templated RSIEval-like caption; index i varies scene, objects, numbers and positions."""
    return (f"This aerial image shows a {SCENES[i % 6]}. There are {NUMBERS[i % 9]} {COLORS[i % 5]} "
            f"{OBJECTS[i % 8]} {WHERE[i % 7]}, and {NUMBERS[(i * 5) % 9]} {OBJECTS[(i + 3) % 8]} "
            f"{WHERE[(i + 2) % 7]}. {LINES[i % 4].capitalize()}.")


def noisy(text: str, rng: np.random.Generator, p: float) -> str:
    """Drop or replace each word with probability p (a caption model's kind of mistakes)."""
    words = []
    for word in text.split():
        u = rng.random()
        if u < p / 2:
            continue
        words.append(str(rng.choice(FILLER)) if u < p else word)
    return " ".join(words)


def make_set(n: int = N_IMAGES, p: float = 0.3, seed: int = 7, prefix: str = "img"):
    rng = np.random.default_rng(seed)
    refs = {f"{prefix}-{i:03d}.png": [reference(i)] for i in range(n)}
    preds = {k: noisy(v[0], rng, p) for k, v in refs.items()}
    return preds, refs


@pytest.fixture(scope="module")
def data():
    return make_set()


@pytest.fixture(scope="module")
def direct(data):
    """pycocoevalcap exactly as its COCO example calls it: tokenize gts and res, run each scorer.

    METEOR runs on pycocoevalcap's Meteor object that rsilora.evaluate shares (it is stateless between
    calls): a second Java process would cost another 8-15 s of start-up, most of this file's budget.
    """
    preds, refs = data
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in preds.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, bleu_img = Bleu(4).compute_score(gts, res)
    meteor = ev._meteor()
    assert type(meteor) is Meteor
    found = {"METEOR": meteor.compute_score(gts, res), "ROUGE-L": Rouge().compute_score(gts, res),
             "CIDEr": Cider().compute_score(gts, res)}
    found.update({f"BLEU-{n + 1}": (bleu[n], bleu_img[n]) for n in range(4)})
    return gts, res, found


@pytest.fixture(scope="module")
def ci30(data):
    return ev.bootstrap_ci(*data, n_resamples=RESAMPLES, seed=0)


def test_score_equals_pycocoevalcap(data, direct):
    _, _, found = direct
    scores = ev.score(*data)
    assert scores.ids == list(data[0]) and set(scores.corpus) == set(ev.METRICS) and scores.spice_note is None
    for metric in ev.METRICS:
        corpus, per_image = found[metric]
        assert scores.corpus[metric] == pytest.approx(corpus, abs=1e-12, rel=0), metric
        assert np.allclose(scores.per_image[metric], per_image, rtol=0, atol=1e-12), metric
        assert len(scores.per_image[metric]) == N_IMAGES


def test_identical_captions_score_perfectly(data):
    _, refs = data
    scores = ev.score({k: v[0] for k, v in refs.items()}, refs)
    assert scores.corpus["BLEU-4"] == pytest.approx(1.0, abs=1e-9)  # BleuScorer's smoothing: 1 - ~1e-11
    assert scores.corpus["ROUGE-L"] == 1.0
    assert scores.corpus["CIDEr"] > 0


def test_empty_prediction_scores_zero(data):
    preds, refs = data
    preds = {**preds, "img-000.png": "", "img-001.png": " ...  "}
    scores = ev.score(preds, refs)
    for metric in ev.METRICS:
        assert scores.per_image[metric][:2] == [0.0, 0.0], metric


def test_tokenize():
    out = ev.tokenize({"a": ["Two PLANES, near a hangar.", ""], "b": ["line\rbreak\u2028inside"], "c": ["ok"]})
    assert out == {"a": ["two planes near a hangar", ""], "b": ["line break inside"], "c": ["ok"]}


def test_identity_resample_equals_pycocoevalcap(direct):
    gts, res, found = direct
    metrics = (*ev.METRICS[:4], "ROUGE-L", "CIDEr")
    prep = ev._prepare(gts, res, list(gts), metrics)
    out = ev._resample_scores(prep, np.arange(N_IMAGES), metrics)
    for metric in ev.METRICS[:4]:
        assert out[metric][0] == found[metric][0], metric  # bit-exact
    assert out["CIDEr"][0] == pytest.approx(found["CIDEr"][0], rel=1e-12, abs=0)
    assert out["ROUGE-L"][0] == pytest.approx(found["ROUGE-L"][0], rel=1e-12, abs=0)


def test_resample_equals_pycocoevalcap_on_duplicated_entries(direct):
    """A resample is scored as if its images were distinct entries (CIDEr's df counts duplicates)."""
    gts, res, _ = direct
    ids = list(gts)
    prep = ev._prepare(gts, res, ids, ("BLEU-4", "CIDEr"))
    indices = np.random.default_rng(3).integers(0, N_IMAGES, size=(3, N_IMAGES))
    out = ev._resample_scores(prep, indices, ("BLEU-4", "CIDEr"))
    for r, row in enumerate(indices):
        dup_gts = {f"{j}:{ids[i]}": gts[ids[i]] for j, i in enumerate(row)}
        dup_res = {f"{j}:{ids[i]}": res[ids[i]] for j, i in enumerate(row)}
        with contextlib.redirect_stdout(io.StringIO()):
            bleu4 = Bleu(4).compute_score(dup_gts, dup_res)[0][3]
        assert out["BLEU-4"][r] == bleu4
        assert out["CIDEr"][r] == pytest.approx(Cider().compute_score(dup_gts, dup_res)[0], rel=1e-12)


def test_resample_with_several_references_and_edge_cases():
    """Already-tokenized text, 1-3 references of varied length, short and empty hypotheses."""
    rng = np.random.default_rng(5)
    gts, res = {}, {}
    for i in range(25):
        refs = [reference(i + j).lower().replace(".", "").replace(",", "") for j in range(1 + i % 3)]
        gts[f"x{i}"] = [r if j != 1 else " ".join(r.split()[:6]) for j, r in enumerate(refs)]
        res[f"x{i}"] = [noisy(refs[0], rng, 0.4) if i % 7 else ["", "two planes", "a"][i // 7 % 3]]
    metrics = (*ev.METRICS[:4], "CIDEr")
    prep = ev._prepare(gts, res, list(gts), metrics)
    indices = np.vstack([np.arange(25), rng.integers(0, 25, size=(2, 25))])
    out = ev._resample_scores(prep, indices, metrics)
    ids = list(gts)
    for r, row in enumerate(indices):
        dup_gts = {f"{j}:{ids[i]}": gts[ids[i]] for j, i in enumerate(row)}
        dup_res = {f"{j}:{ids[i]}": res[ids[i]] for j, i in enumerate(row)}
        with contextlib.redirect_stdout(io.StringIO()):
            bleu = Bleu(4).compute_score(dup_gts, dup_res)[0]
        assert [out[m][r] for m in ev.METRICS[:4]] == bleu
        assert out["CIDEr"][r] == pytest.approx(Cider().compute_score(dup_gts, dup_res)[0], rel=1e-12)


def test_resample_chunking_does_not_change_results(direct, monkeypatch):
    gts, res, _ = direct
    prep = ev._prepare(gts, res, list(gts), ("BLEU-4", "ROUGE-L", "CIDEr"))
    indices = np.random.default_rng(0).integers(0, N_IMAGES, size=(7, N_IMAGES))
    whole = ev._resample_scores(prep, indices, ("BLEU-4", "ROUGE-L", "CIDEr"))
    monkeypatch.setattr(ev, "_WORK_ELEMENTS", 1)  # one resample per chunk
    one_by_one = ev._resample_scores(prep, indices, ("BLEU-4", "ROUGE-L", "CIDEr"))
    for metric, values in whole.items():
        assert np.allclose(values, one_by_one[metric], rtol=1e-13, atol=0), metric


def test_bootstrap_contains_point_and_shrinks_with_more_images(ci30):
    assert set(ci30) == set(ev.METRICS)
    for metric, iv in ci30.items():
        assert iv.low <= iv.point <= iv.high, (metric, iv)
        assert iv.low < iv.high, metric
    preds, refs = {}, {}
    for copy in range(4):  # the same 30 images four times under new ids: a narrower CI
        p, r = make_set(prefix=f"copy{copy}")
        preds.update(p)
        refs.update(r)
    ci120 = ev.bootstrap_ci(preds, refs, n_resamples=RESAMPLES, seed=0)
    assert ci120["BLEU-4"].point == pytest.approx(ci30["BLEU-4"].point, rel=1e-9)
    for metric in ("BLEU-4", "CIDEr"):
        assert ci120[metric].high - ci120[metric].low < 0.75 * (ci30[metric].high - ci30[metric].low), metric


def test_bootstrap_seeds(data, ci30):
    assert ev.bootstrap_ci(*data, n_resamples=RESAMPLES, seed=0) == ci30
    other = ev.bootstrap_ci(*data, n_resamples=RESAMPLES, seed=1)
    assert any((other[m].low, other[m].high) != (ci30[m].low, ci30[m].high) for m in ev.METRICS)
    assert all(other[m].point == ci30[m].point for m in ev.METRICS)


def test_paired_bootstrap_against_itself(data):
    preds, refs = data
    out = ev.paired_bootstrap(preds, dict(preds), refs, n_resamples=RESAMPLES)
    assert list(out) == list(ev.METRICS)
    for metric, d in out.items():
        assert (d.metric, d.difference, d.low, d.high, d.a_better_share) == (metric, 0.0, 0.0, 0.0, 0.0)


def test_paired_bootstrap_better_model(data):
    _, refs = data
    good = {k: v[0] for k, v in refs.items()}
    bad, _ = make_set(p=0.6, seed=11)
    out = ev.paired_bootstrap(good, bad, refs, n_resamples=RESAMPLES, metrics=("CIDEr", "BLEU-4"))
    assert set(out) == {"CIDEr", "BLEU-4"}
    cider = out["CIDEr"]
    assert cider.difference > 0 and 0 < cider.low <= cider.difference <= cider.high
    assert cider.a_better_share > 0.95


def test_input_validation(data):
    preds, refs = data
    wrong = {k: v for k, v in preds.items() if k != "img-003.png"} | {"zzz.png": "a caption"}
    with pytest.raises(ValueError, match=r"img-003\.png.*zzz\.png"):
        ev.score(wrong, refs)
    with pytest.raises(ValueError, match="no predictions"):
        ev.score({}, {})
    with pytest.raises(ValueError, match="img-000.png"):
        ev.score(preds, {**refs, "img-000.png": []})
    with pytest.raises(ValueError, match="unknown metrics"):
        ev.paired_bootstrap(preds, preds, refs, metrics=("BLEU",))
    with pytest.raises(ValueError, match="n_resamples"):
        ev.bootstrap_ci(preds, refs, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        ev.paired_bootstrap(preds, preds, refs, confidence=1.5)


def test_missing_java_is_a_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ev.JavaMissingError, match="apt-get install -y default-jre-headless"):
        ev.check_java()
    with pytest.raises(ev.JavaMissingError):
        ev.score(*data)


def test_spice_offline_is_a_note_not_a_crash(data, monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    def offline():
        raise OSError("network is unreachable")

    monkeypatch.setattr(spice_module, "get_stanford_models", offline)
    monkeypatch.setattr(ev, "_spice_unavailable", None)
    monkeypatch.setattr(ev, "_spice_warned", False)
    with pytest.warns(RuntimeWarning, match="SPICE"):
        first = ev.score(*data, spice=True)
    assert "SPICE" not in first.corpus and "network is unreachable" in first.spice_note
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent
        second = ev.score(*data, spice=True)
    assert second.spice_note == first.spice_note and second.corpus == first.corpus
